"""Every code sample of the documentation is a file under docs_src/ (pages include them with pymdownx.snippets):
each one compiles, and the complete ones run here. The tutorial's shell steps run in tests/test_newcomer.py."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "docs_src").rglob("*.py"))
TUTORIAL = ROOT / "docs_src" / "tutorial"


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_sample_compiles(path: Path) -> None:
    """Fragments of the guides (a few lines out of an application) included: at least valid Python."""
    compile(path.read_text(encoding="utf-8"), str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.fixture
def tutorial_module(monkeypatch: pytest.MonkeyPatch):
    """The tutorial's files as a reader has them: app.py and test_app.py side by side, `from app import api`."""
    monkeypatch.syspath_prepend(str(TUTORIAL))
    for name in ("app", "test_app"):
        sys.modules.pop(name, None)
    yield importlib.import_module
    for name in ("app", "test_app"):
        sys.modules.pop(name, None)


def test_the_tutorials_tests_pass(tutorial_module) -> None:
    """docs_src/tutorial/test_app.py, each test run as the reader's async runner would."""
    tests = tutorial_module("test_app")
    found = [(name, fn) for name, fn in vars(tests).items() if name.startswith("test_") and inspect.iscoroutinefunction(fn)]
    assert len(found) >= 3
    for _, fn in found:
        asyncio.run(fn())


def test_the_tutorials_handler_rejects_what_it_says(tutorial_module) -> None:
    """The tutorial's own tests can fail: a note too long is refused with the code the page shows."""
    from secure_ws.client import RequestError
    from secure_ws.testing import TestServer

    api = tutorial_module("app").api

    async def main() -> None:
        async with TestServer(api) as server, server.connect(sub="alice", scope="notes:write") as ws:
            with pytest.raises(RequestError) as error:
                await ws.call("notes.add", {"text": "x" * 201})
            assert error.value.code == "bad_note"

    asyncio.run(main())


def test_the_readme_application_does_what_the_readme_says() -> None:
    """README.md's application: the greeting push, a subscribe, the handler's publish and Reject, api.publish."""
    from docs_src.readme import app as readme_app
    from secure_ws.client import RequestError
    from secure_ws.testing import TestServer

    async def main() -> None:
        async with TestServer(readme_app.api) as server:
            async with server.connect(sub="alice", scope="chat:write subscribe:room.*") as ws:
                assert await anext(ws.pushes()) == {"motd": "hello alice"}
                await ws.subscribe("room.lobby")
                lobby = ws.messages("room.lobby")
                await ws.call("chat.say", {"text": "hi"})
                assert {k: v for k, v in (await anext(lobby)).items() if k in ("from", "data")} == {"from": "alice", "data": {"text": "hi"}}
                await readme_app.announce("closing soon")
                assert (await anext(lobby))["data"] == {"text": "closing soon"}
                with pytest.raises(RequestError) as error:
                    await ws.call("chat.say", {"text": ""})
                assert error.value.code == "bad_text"

    asyncio.run(main())


def test_the_channel_hooks_sample_does_what_the_handlers_guide_says() -> None:
    """docs_src/guides/handlers_4.py: the path parameter, ctx.subscribe from on_connect, both hooks' data and refusals."""
    from docs_src.guides import handlers_4 as sample
    from secure_ws.client import RequestError
    from secure_ws.testing import TestServer

    async def main() -> None:
        async with TestServer(sample.api) as server:
            async with server.connect(sub="alice", scope="subscribe:room.* publish:room.*", path="/ws/acme") as ws:
                own = ws.messages("user.alice")
                await sample.api.publish("user.alice", "for you")
                assert (await anext(own))["data"] == "for you"
                assert (await ws.subscribe("room.lobby"))["data"] == {"topic": "welcome to room.lobby"}
                lobby = ws.messages("room.lobby")
                await ws.publish("room.lobby", {"text": "  hi  "})
                assert (await anext(lobby))["data"] == {"text": "hi"}
                with pytest.raises(RequestError) as error:
                    await ws.publish("room.lobby", {"words": "hi"})
                assert error.value.code == "bad_message"
            async with server.connect(sub="mallory", scope="subscribe:room.*", path="/ws/acme") as ws:
                with pytest.raises(RequestError) as error:
                    await ws.subscribe("room.lobby")
                assert error.value.code == "not_a_member"

    asyncio.run(main())
