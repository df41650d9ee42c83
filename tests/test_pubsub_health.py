"""SPEC §15: a pub/sub connection that Redis closed, or that went silent, is noticed within seconds and
re-established by itself; publications made meanwhile still reach the subscribers (from history), and a
silent one shows on ``/readyz`` and in ``secure_ws_storage_pubsub_up`` while it lasts.

Each test starts its own ``redis-server`` and two server processes on it: a publisher's and a subscriber's.
"""

from __future__ import annotations

import os
import signal
import time

from helpers import Server, base_env, metric, recv_json, request, run, scrape, wait_for, welcome

SCOPE = "subscribe:* publish:*"
DETECT_WITHIN = 1.0 + 3.0 + 4.0  # ping after 1 s of silence, dead after 3 s unanswered, plus reads, the reconnection and the scrapes


def _pair(keydir, url: str) -> tuple[Server, Server]:
    env = base_env(keydir, SECURE_WS_STORAGE_URL=url, SECURE_WS_RATE_LIMIT="1000/second")
    return Server(keydir, env).start(), Server(keydir, env).start()


def test_a_pubsub_connection_redis_killed_loses_no_publication(keydir, issue, own_redis):
    redis_server = own_redis()
    pub_side, sub_side = _pair(keydir, redis_server.url)

    async def go() -> None:
        async with pub_side.connect(issue(scope=SCOPE)) as pub, sub_side.connect(issue(scope=SCOPE)) as sub:
            await welcome(pub)
            await welcome(sub)
            subscribed = await request(sub, {"type": "subscribe", "channel": "feed"})
            start = subscribed["offset"]
            client = redis_server.client()
            try:
                for round_ in range(3):
                    wait_for(lambda: dict(client.pubsub_numsub("sws:ch:{feed}"))[b"sws:ch:{feed}"] >= 1, 10,
                             "the subscriber's server subscribed")
                    killed = client.client_kill_filter(_type="pubsub")  # what Redis does to a slow or idle client
                    assert killed >= 1
                    for n in range(5):  # straight after the kill, before the subscriber's server re-subscribed
                        assert (await request(pub, {"type": "publish", "channel": "feed", "data": [round_, n]}))["type"] == "published"
            finally:
                client.close()
            frames = [await recv_json(sub, 10) for _ in range(15)]
            assert [f["offset"] for f in frames] == list(range(start + 1, start + 16)), frames
            assert [f["data"] for f in frames] == [[r, n] for r in range(3) for n in range(5)]

    try:
        run(go())
    finally:
        pub_side.stop()
        sub_side.stop()


def test_a_silent_pubsub_connection_is_reported_and_re_established(keydir, issue, own_redis):
    redis_server = own_redis()
    pub_side, sub_side = _pair(keydir, redis_server.url)

    async def go() -> None:
        async with sub_side.connect(issue(scope=SCOPE)) as sub:
            await welcome(sub)
            start = (await request(sub, {"type": "subscribe", "channel": "feed"}))["offset"]
            assert metric(scrape(sub_side), "secure_ws_storage_pubsub_up") == 1
            assert redis_server.proc is not None
            os.kill(redis_server.proc.pid, signal.SIGSTOP)  # every connection open, nothing answers: a cut network
            try:
                frozen = time.monotonic()
                wait_for(lambda: metric(scrape(sub_side), "secure_ws_storage_pubsub_up") == 0, DETECT_WITHIN,
                         "the silent pub/sub connection noticed in the metrics", every=0.25)
                assert sub_side.get("/readyz")[0] == 503
                noticed = time.monotonic() - frozen
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            wait_for(lambda: sub_side.get("/readyz")[0] == 200, 10, "/readyz 200 again", every=0.25)
            wait_for(lambda: metric(scrape(sub_side), "secure_ws_storage_pubsub_up") == 1, 10, "pub/sub up again", every=0.25)
            async with pub_side.connect(issue(scope=SCOPE)) as pub:
                await welcome(pub)
                assert (await request(pub, {"type": "publish", "channel": "feed", "data": "after"}))["type"] == "published"
            frame = await recv_json(sub, 10)
            assert frame["data"] == "after" and frame["offset"] == start + 1, frame
            print(f"\nsilent pub/sub noticed after {noticed:.1f}s")

    try:
        run(go())
    finally:
        pub_side.stop()
        sub_side.stop()
