"""SPEC §9: registration mistakes fail at import, with a message that says what to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import base_env

from secure_ws import Context, RegistrationError, SecureWS
from secure_ws.settings import load_settings


@pytest.fixture
def api(keydir: Path) -> SecureWS:
    return SecureWS(load_settings(base_env(keydir), env_file=None))


async def ok(ctx: Context, data: Any) -> Any:
    return data


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"type": "ping"}, "built-in type"),
        ({"type": "result"}, "built-in type"),
        ({"type": "9lives"}, "must match"),
        ({"type": "a" * 65}, "must match"),
        ({"type": "has space"}, "must match"),
        ({"type": "x", "rate_limit": "lots"}, "not a rate limit"),
        ({"type": "x", "scope": "orders:*"}, "scope="),
        ({"type": "x", "scope": "a b"}, "scope="),
    ],
)
def test_bad_registrations(api: SecureWS, kwargs: dict[str, Any], message: str) -> None:
    kind = kwargs.pop("type")
    with pytest.raises(RegistrationError, match=message):
        api.handler(kind, **kwargs)(ok)


def test_twice_names_both_places(api: SecureWS) -> None:
    api.handler("orders.create")(ok)
    with pytest.raises(RegistrationError, match=r"registered twice \(.*ok and .*ok\)"):
        api.handler("orders.create")(ok)


def test_handler_shape(api: SecureWS) -> None:
    def sync(ctx: Context, data: Any) -> Any:
        return data

    async def one(ctx: Context) -> Any:
        return None

    with pytest.raises(RegistrationError, match="async def"):
        api.handler("a")(sync)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match=r"two arguments: \(ctx, data\)"):
        api.handler("b")(one)  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="api.handler"):
        api.handler(ok)  # type: ignore[arg-type]  # @api.handler without the type
    with pytest.raises(RegistrationError, match="async def"):
        api.on_connect(sync)  # type: ignore[arg-type]


def test_stream_shape(api: SecureWS) -> None:
    async def chunks(ctx: Context, data: Any) -> Any:
        yield data

    async def one(ctx: Context) -> Any:
        yield None

    with pytest.raises(RegistrationError, match="`async def` generator"):
        api.stream("s.a")(ok)  # a coroutine function, not a generator
    with pytest.raises(RegistrationError, match="@api.stream"):
        api.handler("s.b")(chunks)  # type: ignore[arg-type]  # a generator registered as a plain handler
    with pytest.raises(RegistrationError, match=r"two arguments: \(ctx, data\)"):
        api.stream("s.c")(one)
    with pytest.raises(RegistrationError, match="api.stream"):
        api.stream(chunks)  # type: ignore[arg-type]  # @api.stream without the type
    for taken in ("cancel", "chunk"):
        with pytest.raises(RegistrationError, match="built-in type"):
            api.stream(taken)(chunks)
    api.stream("s.d", scope="ai:use", rate_limit="10/minute")(chunks)
    with pytest.raises(RegistrationError, match="registered twice"):
        api.handler("s.d")(ok)


def test_unresolvable_annotation(api: SecureWS) -> None:
    import pydantic  # noqa: F401  (models are looked for once pydantic is loaded)

    async def typed(ctx: Context, data: NoSuchModel) -> Any:  # type: ignore[name-defined]  # noqa: F821
        return data

    with pytest.raises(RegistrationError, match="annotations do not resolve"):
        api.handler("typed")(typed)


def test_registry_freezes_when_serving(api: SecureWS) -> None:
    import asyncio

    async def go() -> None:
        async with api.lifespan():
            with pytest.raises(RegistrationError, match="before the app starts serving"):
                api.handler("late")(ok)

    asyncio.run(go())


def test_bad_environment_is_one_line_when_the_app_starts_serving(keydir: Path, tmp_path: Path) -> None:
    """The module imports (a test suite can build a TestServer around it); serving it reads the settings: one line,
    exit code 2. (Under uvicorn that happens at import, before it binds: see test_settings.)"""
    import subprocess
    import sys

    env = base_env(keydir, SECURE_WS_HANDLER_TIMEOUT="soon", PYTHONPATH=str(tmp_path))
    (tmp_path / "myapp.py").write_text("from secure_ws import SecureWS\napi = SecureWS()\napp = api.app\n")
    imported = subprocess.run([sys.executable, "-c", "import myapp"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (imported.returncode, imported.stderr) == (0, "")
    lifespan = "import asyncio, myapp\nasync def go():\n    async with myapp.api.lifespan(): pass\nasyncio.run(go())\n"
    result = subprocess.run([sys.executable, "-c", lifespan], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    expected = "secure-ws: configuration error: SECURE_WS_HANDLER_TIMEOUT: not a timeout: 'soon' (use e.g. 10s, 500ms, 1m)"
    assert result.stderr.strip().splitlines() == [expected]
