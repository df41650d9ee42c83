"""An application on secure_ws for the streaming tests: every streaming and cancellation behaviour has a type here.

What the generators did is kept per worker in ``events`` (bounded) and read back by the ``events`` handler,
so a test can see that a generator's ``finally`` ran, or how far a paused generator got.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from secure_ws import Context, Reject, SecureWS

api = SecureWS()

# (what, the call's tag, time.monotonic()) of generator events; the last 1000 only.
events: deque[tuple[str, Any, float]] = deque(maxlen=1000)
produced: dict[Any, int] = {}  # tag → chunks a "big" stream has yielded so far (at most a few tags per test run)


def note(what: str, tag: Any) -> None:
    events.append((what, tag, time.monotonic()))


@api.stream("count")
async def count(ctx: Context, data: Any) -> Any:
    """``{"n": N, "delay": seconds}``: yields 0..N-1."""
    for i in range(data["n"]):
        if data.get("delay"):
            await asyncio.sleep(data["delay"])
        yield i


@api.stream("scoped", scope="ai:use", rate_limit="2/minute")
async def scoped(ctx: Context, data: Any) -> Any:
    yield {"sub": ctx.sub}


@api.stream("job.run")
async def job_run(ctx: Context, data: Any) -> Any:
    """Progress of a job: each step published to ``job.<sub>`` (any worker's subscribers) and yielded as a chunk."""
    for step in range(data["steps"]):
        await ctx.publish(f"job.{ctx.sub}", {"step": step})
        yield {"step": step}


@api.stream("raises.after")
async def raises_after(ctx: Context, data: Any) -> Any:
    yield 1
    yield 2
    raise RuntimeError("stream bug with secret detail")


@api.stream("rejects.after")
async def rejects_after(ctx: Context, data: Any) -> Any:
    yield "first"
    raise Reject("sold_out", "no more")


@api.stream("not.json.chunk")
async def not_json_chunk(ctx: Context, data: Any) -> Any:
    yield "fine"
    yield {"when": object()}


@api.stream("silent")
async def silent(ctx: Context, data: Any) -> Any:
    try:
        await asyncio.Event().wait()  # never set: only a timeout or a cancel ends it
        yield None
    finally:
        note("silent.finally", data)


@api.stream("slow.chunks")
async def slow_chunks(ctx: Context, data: Any) -> Any:
    """One chunk every ``data`` seconds, forever: only the stream timeout ends it."""
    while True:
        await asyncio.sleep(data)
        yield "tick"


@api.stream("forever")
async def forever(ctx: Context, data: Any) -> Any:
    """Yields as fast as it may, forever; its ``finally`` notes that it was closed."""
    note("forever.start", data)
    try:
        while True:
            await asyncio.sleep(0)
            yield "x"
    finally:
        note("forever.finally", data)


@api.stream("waits")
async def waits(ctx: Context, data: Any) -> Any:
    """One chunk, then waits forever in an await (the work a cancel must interrupt)."""
    note("waits.start", data)
    try:
        yield "ready"
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        note("waits.cancelled", data)
        raise
    finally:
        note("waits.finally", data)


@api.stream("stubborn")
async def stubborn(ctx: Context, data: Any) -> Any:
    """Catches its cancellation and goes on yielding: the call must still end, once."""
    yield 0
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    for i in range(3):
        yield i


@api.stream("big")
async def big(ctx: Context, data: Any) -> Any:
    """``{"tag": T, "size": bytes, "n": chunks}``: n chunks of a size-long string; ``produced[T]`` counts them."""
    piece = "x" * data["size"]
    tag = data["tag"]
    produced[tag] = 0
    if len(produced) > 100:
        produced.pop(next(iter(produced)))
    for _ in range(data["n"]):
        produced[tag] += 1
        yield piece


@api.handler("produced")
async def produced_so_far(ctx: Context, data: Any) -> Any:
    return produced.get(data, 0)


@api.handler("hang")
async def hang(ctx: Context, data: Any) -> Any:
    note("hang.start", data)
    try:
        await asyncio.Event().wait()
    finally:
        note("hang.finally", data)


@api.handler("events")
async def events_so_far(ctx: Context, data: Any) -> Any:
    return [[what, tag, at] for what, tag, at in events if tag == data]


app = api.app
