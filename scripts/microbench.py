#!/usr/bin/env python3
"""Micro-benchmark of the per-handshake and per-frame costs, in process (no sockets).

    python scripts/microbench.py [--n 20000]

Prints µs per operation (best of 5 rounds, so noise from a shared machine
inflates nothing): token verification per algorithm, the full handshake
authentication (verify + revocation check), one rate-limit hit, parsing one
WebSocket frame, and one frame through a session (rate-limit hit → parse →
dispatch → encode the reply) as secure_ws's WebSocket protocol calls it, with a
writer that discards the reply. For end-to-end ratios against a bare
Starlette server see ``scripts/bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import client_frame  # noqa: E402  (scripts/bench.py, beside this script)
from secure_ws.auth.signing import SigningKeys, issue_token  # noqa: E402
from secure_ws.core.handlers import Registry  # noqa: E402
from secure_ws.core.ratelimit import Limiter  # noqa: E402
from secure_ws.core.session import Session  # noqa: E402
from secure_ws.service import Service  # noqa: E402
from secure_ws.settings import load_settings  # noqa: E402
from secure_ws.wire.framing import Parser  # noqa: E402


def best(samples: list[float]) -> float:
    return min(samples)


async def noop(value: object = None) -> None:
    pass


async def bench_echo(ctx: object, data: object) -> object:
    return data


async def timeit(fn, n: int, rounds: int = 5) -> float:  # noqa: ANN001
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return best(times)


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    env = {
        "SECURE_WS_JWKS_FILE": str(tmp / "jwks.json"),
        "SECURE_WS_SIGNING_KEYS_FILE": str(tmp / "signing.json"),
        "SECURE_WS_REVOCATION_FILE": str(tmp / "revocations.json"),
        "SECURE_WS_RATE_LIMIT": "1000000000/second",
    }
    os.environ.update(env)
    settings = load_settings(env_file=None)
    results: dict[str, float] = {}
    keys = SigningKeys(settings)
    for alg in ("RS256", "ES256", "EdDSA"):  # EdDSA last: it stays active for the session run below
        keys.rotate(alg)
        settings = load_settings(env_file=None)
        service = Service(settings)
        token = issue_token("bench", ttl=900, settings=settings)
        results[f"verify {alg} (first sight)"] = await timeit(lambda service=service, token=token: service.verifier._verify(token), n // 4)
    results["verify EdDSA, cached (a reconnect with the same token)"] = await timeit(
        lambda: service.verifier.verify(token), n
    )
    limiter = Limiter(settings.rate_limits, "sliding-window", service.storage.limiter_storage, "msg")
    results["rate-limit hit (memory, sliding window)"] = await timeit(lambda: limiter.hit("bench"), n)

    # A started service (authentication waits for the lifespan) with the built-ins plus one Python
    # handler, as scripts/bench_app.py serves them.
    registry = Registry()
    registry.add("bench.echo", bench_echo)
    service = Service(settings, registry)
    async with service.lifespan():
        results["authenticate EdDSA, cached (+ revocation check)"] = await timeit(lambda: service.authenticate(token), n)
        await _frames(results, service, token, n)


async def _frames(results: dict[str, float], service: Service, token: str, n: int) -> None:
    principal = await service.authenticate(token)
    masked = client_frame(b'{"type":"echo","data":"hello, world"}')
    parser = Parser(65536)
    results["parse one masked 37-byte text frame"] = await timeit(lambda: noop(parser.feed(masked)), n)
    # As secure_ws.uvicorn.ws_protocol drives it: Session.frame called from the socket's read, replies handed to a
    # writer (here one that discards them) instead of the transport.
    assert service.session_deps is not None
    session = Session(service.session_deps, None, principal)
    session._write = lambda text: True
    for label, text in (
        ("frame: echo", json.dumps({"type": "echo", "data": {"n": 1, "text": "hello"}})),
        ("frame: ping", '{"type":"ping"}'),
    ):
        results[f"{label} (hit + parse + dispatch + encode)"] = await timeit(lambda text=text: noop(session.frame(text)), n)
    calls = session._calls
    handler_frame = json.dumps({"type": "bench.echo", "id": 1, "data": {"n": 1, "text": "hello"}})

    async def handler_call() -> None:
        session.frame(handler_frame)
        for call in tuple(calls):
            await call

    results["frame: handler call (… + its task, its reply)"] = await timeit(handler_call, n)

    # The JSON codecs on our real messages: the standard library's (what decode keeps) and orjson (what
    # encode uses), so the choice in secure_ws.wire.messages can be checked on any machine.
    import orjson

    from secure_ws.wire.messages import _encoder, _parse

    request = '{"type":"publish","channel":"room.lobby","data":{"text":"hello there","n":[1,2,3]}}'
    message = {"type": "message", "channel": "room.lobby", "from": "user-42", "data": {"text": "hello", "n": [1, 2]}}
    results["decode a publish request: json (C scanner)"] = await timeit(lambda: noop(_parse(request)), n)
    results["decode a publish request: orjson"] = await timeit(lambda: noop(orjson.loads(request)), n)
    results["encode a channel message: json (C encoder)"] = await timeit(lambda: noop(_encoder.encode(message)), n)
    results["encode a channel message: orjson"] = await timeit(lambda: noop(orjson.dumps(message).decode()), n)

    width = max(map(len, results))
    print(f"{'operation':<{width}}  µs/op (best of 5)")
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    asyncio.run(main(parser.parse_args().n))
