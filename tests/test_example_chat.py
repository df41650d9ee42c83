"""The chat example (examples/chat/app.py) over the real wire: uvicorn + TLS, the real `websockets` client.

The server runs ``uvicorn examples.chat.app:app`` as the README documents it; its working directory is the
key directory, so ``--app-dir`` names the repository root (what running from the root does by itself).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    ROOT,
    AppServer,
    Server,
    base_env,
    closed_with,
    recv_json,
    request,
    run,
    running_pair,
    sans_position,
    unique_sub,
    welcome,
)

CHAT = "subscribe:room.* chat:write"


@pytest.fixture(scope="module")
def chat(keydir: Path) -> Any:
    srv = AppServer(keydir, base_env(keydir), app="examples.chat.app:app", app_dir=ROOT).start()
    yield srv
    srv.stop()


async def joined(ws: Any, sub: str) -> dict[str, Any]:
    """The welcome, then on_connect's subscription to chat.online and its push, in that order."""
    hello = await welcome(ws)
    online = await recv_json(ws)
    assert online == {"type": "subscribed", "channel": "chat.online"}, online  # no id: the server subscribed it
    motd = await recv_json(ws)
    assert motd["type"] == "push" and sub in motd["data"]["motd"], motd
    assert motd["data"]["rooms"] == ["lobby", "random", "help"]
    return hello


def test_two_users_in_a_room_see_each_others_messages(chat: Server, issue: Any) -> None:
    alice, bob = unique_sub("alice"), unique_sub("bob")

    async def go() -> None:
        async with chat.connect(issue(alice, scope=CHAT)) as a, chat.connect(issue(bob, scope=CHAT)) as b:
            await joined(a, alice)
            await joined(b, bob)
            first = await request(a, {"type": "subscribe", "id": "s", "channel": "room.lobby"})
            assert sans_position(first) == {"type": "subscribed", "id": "s", "channel": "room.lobby", "data": {"online": []}}
            second = await request(b, {"type": "subscribe", "id": "s", "channel": "room.lobby"})
            assert second["data"] == {"online": [alice]}  # on_subscribe tells who is in the room (presence)
            await a.send(json.dumps({"type": "chat.say", "id": 1, "data": {"room": "lobby", "text": "hi bob"}}))
            said = {"type": "message", "channel": "room.lobby", "from": alice, "data": {"text": "hi bob"}}
            mine = [await recv_json(a), await recv_json(a)]  # the reply and her own message, in either order
            mine = [sans_position(f) if f["type"] == "message" else f for f in mine]
            assert {"type": "result", "id": 1, "data": {"sent": True}} in mine and said in mine
            assert sans_position(await recv_json(b)) == said
            await b.send(json.dumps({"type": "chat.say", "id": 2, "data": {"room": "lobby", "text": "hi alice"}}))
            assert sans_position(await recv_json(a)) == {"type": "message", "channel": "room.lobby", "from": bob, "data": {"text": "hi alice"}}

    run(go())


def test_rejects_bad_data_and_missing_scope(chat: Server, issue: Any) -> None:
    async def go() -> None:
        sub = unique_sub()
        async with chat.connect(issue(sub, scope=CHAT)) as ws:
            await joined(ws, sub)
            reply = await request(ws, {"type": "chat.say", "id": 1, "data": {"room": "nowhere", "text": "hi"}})
            assert reply == {"type": "error", "id": 1, "code": "bad_room", "message": "no such room; rooms: lobby, random, help"}
            long = await request(ws, {"type": "chat.say", "id": 2, "data": {"room": "lobby", "text": "x" * 501}})
            assert long["type"] == "error" and long["code"] == "bad_request" and "text" in long["message"], long
            assert "xxx" not in long["message"]  # fields are named, values never echoed
            bad = await request(ws, {"type": "chat.say", "id": 3, "data": {"room": "no spaces!", "text": "hi"}})
            assert bad["code"] == "bad_request" and "room" in bad["message"], bad
            assert (await request(ws, {"type": "chat.say", "id": 4}))["code"] == "bad_request"  # no data at all
            assert (await request(ws, {"type": "chat.kick", "id": 5, "data": {"sub": sub}}))["code"] == "forbidden"
            assert (await request(ws, {"type": "ping", "id": 6})) == {"type": "pong", "id": 6}  # still open
        reader = unique_sub("reader")
        async with chat.connect(issue(reader, scope="subscribe:room.*")) as ws:  # may read, may not speak
            await joined(ws, reader)
            reply = await request(ws, {"type": "chat.say", "id": 7, "data": {"room": "lobby", "text": "hi"}})
            assert reply["type"] == "error" and reply["id"] == 7 and reply["code"] == "forbidden", reply

    run(go())


def test_room_rules_hold_for_subscribe_and_publish(chat: Server, issue: Any) -> None:
    """on_subscribe admits only the chat's rooms; on_publish gives a client's own publish chat.say's checks."""
    sub = unique_sub()

    async def go() -> None:
        async with chat.connect(issue(sub, scope="subscribe:room.* publish:room.*")) as ws:
            await joined(ws, sub)
            refused = await request(ws, {"type": "subscribe", "id": 1, "channel": "room.attic"})
            assert refused == {"type": "error", "id": 1, "code": "bad_room", "message": "no such room; rooms: lobby, random, help"}
            await request(ws, {"type": "subscribe", "id": 2, "channel": "room.help"})
            for n, data in enumerate(({"text": ""}, {"text": "x" * 501}, "hi", {"text": "hi", "extra": 1}), 3):
                bad = await request(ws, {"type": "publish", "id": n, "channel": "room.help", "data": data})
                assert bad["code"] == "bad_message" and "xxx" not in bad["message"], bad
            attic = await request(ws, {"type": "publish", "id": 7, "channel": "room.attic", "data": {"text": "hi"}})
            assert attic["code"] == "bad_room"
            assert await request(ws, {"type": "publish", "channel": "room.help", "data": {"text": "hi"}}) == \
                {"type": "published", "channel": "room.help"}
            said = sans_position(await recv_json(ws))
            assert said == {"type": "message", "channel": "room.help", "from": sub, "data": {"text": "hi"}}
            # chat.online is the server's: a client may neither read nor publish it.
            assert (await request(ws, {"type": "publish", "id": 8, "channel": "chat.online", "data": 1}))["code"] == "forbidden"

    run(go())


def test_who_is_the_same_on_two_servers_sharing_redis(keydir: Path, own_redis: Any, issue: Any) -> None:
    """The online list is presence, shared through Redis: each server lists the other's connections too."""
    env = base_env(keydir, SECURE_WS_STORAGE_URL=own_redis().url)
    alice, bob = unique_sub("alice"), unique_sub("bob")
    with running_pair(lambda: AppServer(keydir, env, app="examples.chat.app:app", app_dir=ROOT)) as (a, b):
        async def go() -> None:
            async with a.connect(issue(alice, scope=CHAT)) as on_a, b.connect(issue(bob, scope=CHAT)) as on_b:
                await joined(on_a, alice)
                await joined(on_b, bob)
                for ws in (on_a, on_b):
                    assert (await request(ws, {"type": "chat.who", "id": 1}))["data"] == {"online": sorted([alice, bob]), "count": 2}
                await request(on_a, {"type": "subscribe", "id": 2, "channel": "room.lobby"})
                entered = await request(on_b, {"type": "subscribe", "id": 3, "channel": "room.lobby"})
                assert entered["data"] == {"online": [alice]}  # subscribed on the other server

        run(go())


def test_say_has_its_own_window(chat: Server, issue: Any) -> None:
    sub = unique_sub()

    async def go() -> None:
        async with chat.connect(issue(sub, scope=CHAT)) as ws:
            await joined(ws, sub)
            for i in range(10):  # rate_limit="10/10 seconds"
                assert (await request(ws, {"type": "chat.say", "id": i, "data": {"room": "help", "text": "?"}}))["data"] == {"sent": True}
            limited = await request(ws, {"type": "chat.say", "id": 10, "data": {"room": "help", "text": "?"}})
            assert limited["code"] == "rate_limited" and 0 < limited["retry_after_ms"] <= 10_000, limited
            assert (await request(ws, {"type": "chat.who", "id": 11}))["type"] == "result"  # other types are not limited by it

    run(go())


def test_who_follows_connects_and_disconnects(chat: Server, issue: Any) -> None:
    alice, bob = unique_sub("alice"), unique_sub("bob")

    async def who(ws: Any) -> list[str]:
        reply = await request(ws, {"type": "chat.who", "id": "w"})
        assert reply["type"] == "result" and reply["id"] == "w", reply
        assert len(reply["data"]["online"]) <= reply["data"]["count"]
        return reply["data"]["online"]

    async def go() -> None:
        async with chat.connect(issue(alice, scope=CHAT)) as a:
            await joined(a, alice)
            async with chat.connect(issue(bob)) as b:  # chat.who needs no scope
                await joined(b, bob)
                assert {alice, bob} <= set(await who(a))
            deadline = asyncio.get_running_loop().time() + 5
            while bob in await who(a):  # on_disconnect runs once bob's connection has ended
                assert asyncio.get_running_loop().time() < deadline, "bob is still listed"
            assert alice in await who(a)

    run(go())


def test_admin_kick_pushes_then_disconnects(chat: Server, issue: Any) -> None:
    admin, mallory = unique_sub("admin"), unique_sub("mallory")

    async def go() -> None:
        async with chat.connect(issue(admin, scope="chat:admin")) as boss, chat.connect(issue(mallory, scope=CHAT)) as m:
            await joined(boss, admin)
            await joined(m, mallory)
            reply = await request(boss, {"type": "chat.kick", "id": 1, "data": {"sub": mallory}})
            assert reply == {"type": "result", "id": 1, "data": {"kicked": mallory}}
            assert await recv_json(m) == {"type": "push", "data": {"kicked_by": admin}}
            assert await closed_with(m) == (1008, "disconnected")
            assert (await request(boss, {"type": "ping"}))["type"] == "pong"  # the admin stays
        async with chat.connect(issue(mallory, scope=CHAT)) as again:  # a kick is not a ban
            await joined(again, mallory)

    run(go())


# -- the same application, as its own test suite would test it: in process, with secure_ws.testing ----------------


def test_in_process_say_reaches_the_room_and_who_lists_the_speakers() -> None:
    from examples.chat.app import api
    from secure_ws.testing import TestServer

    async def go() -> None:
        async with TestServer(api) as server:
            async with server.connect(sub="alice", scope=CHAT) as alice, server.connect(sub="bob", scope=CHAT) as bob:
                greeting = await asyncio.wait_for(anext(alice.pushes()), 5)  # on_connect's push, kept for the iterator
                assert "alice" in greeting["motd"] and greeting["rooms"] == ["lobby", "random", "help"]
                await bob.subscribe("room.lobby")
                room = bob.messages("room.lobby")
                assert await alice.call("chat.say", {"room": "lobby", "text": "hi bob"}) == {"sent": True}
                said = await asyncio.wait_for(anext(room), 5)
                assert (said["from"], said["data"]) == ("alice", {"text": "hi bob"})
                assert await alice.call("chat.who") == {"online": ["alice", "bob"], "count": 2}

    run(go())


def test_in_process_bad_rooms_fields_and_scopes_are_refused() -> None:
    from examples.chat.app import api
    from secure_ws.client import RateLimited, RequestError
    from secure_ws.testing import TestServer

    async def refused(ws: Any, type: str, data: Any) -> RequestError:
        with pytest.raises(RequestError) as info:
            await ws.call(type, data)
        return info.value

    async def go() -> None:
        async with TestServer(api) as server:
            async with server.connect(sub="carol", scope=CHAT) as ws:
                assert (await refused(ws, "chat.say", {"room": "nowhere", "text": "hi"})).code == "bad_room"
                long = await refused(ws, "chat.say", {"room": "lobby", "text": "x" * 501})
                assert long.code == "bad_request" and "text" in long.message and "xxx" not in long.message
                assert (await refused(ws, "chat.kick", {"sub": "dave"})).code == "forbidden"
            async with server.connect(sub="dave", scope=CHAT) as ws:
                for _ in range(10):  # rate_limit="10/10 seconds"
                    assert await ws.call("chat.say", {"room": "help", "text": "?"}) == {"sent": True}
                limited = await refused(ws, "chat.say", {"room": "help", "text": "?"})
                assert isinstance(limited, RateLimited) and 0 < limited.retry_after_ms <= 10_000
            async with server.connect(sub="reader", scope="subscribe:room.*") as ws:
                assert (await refused(ws, "chat.say", {"room": "lobby", "text": "hi"})).code == "forbidden"

    run(go())


def test_in_process_kick_pushes_then_disconnects() -> None:
    from examples.chat.app import api
    from secure_ws.testing import TestServer

    async def go() -> None:
        async with TestServer(api) as server:
            async with server.connect(sub="boss", scope="chat:admin") as boss, server.connect(sub="mallory", scope=CHAT) as m:
                pushes = m.pushes()
                assert await boss.call("chat.kick", {"sub": "mallory"}) == {"kicked": "mallory"}
                assert (await asyncio.wait_for(anext(pushes), 5))["motd"]
                assert await asyncio.wait_for(anext(pushes), 5) == {"kicked_by": "boss"}
                assert await m.wait_closed() == (1008, "disconnected")
                assert await boss.ping() > 0
            async with server.connect(sub="mallory", scope=CHAT) as again:  # a kick is not a ban
                assert await again.call("chat.who") == {"online": ["mallory"], "count": 1}

    run(go())
