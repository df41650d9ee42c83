"""A simulated model completion that streams its answer word by word, on secure_ws.

Run it from the repository root (it needs the pydantic extra: ``pip install "secure-ws[pydantic]"``)::

    secure-ws serve examples.completion.app:api

A client whose token grants ``ai:use`` asks for a completion and reads it as it is "generated":

- ``{"type":"ai.complete","id":1,"data":{"prompt":"tell me about streams","max_words":5}}`` →
  ``{"type":"chunk","id":1,"seq":0,"data":{"text":"Streams"}}``, ``…"seq":1,"data":{"text":" carry"}}``, … then
  ``{"type":"result","id":1,"data":{"chunks":5}}``;
- ``{"type":"cancel","id":1}`` while it streams stops the "model" at once (the generator is closed, the sleep it
  was in is cancelled, its ``finally`` runs) → ``{"type":"error","id":1,"code":"cancelled","message":"cancelled"}``.

A client that stops reading pauses the generation instead of piling words up in the server; closing the
connection cancels it. ``ai.usage`` answers how many words this worker has generated, and how many
generations were cut short, for the example's tests and for curiosity.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from secure_ws import Context, Reject, SecureWS

api = SecureWS()  # settings from the environment and .env, exactly as for `secure-ws serve`

# What the "model" knows: it answers every prompt with this text, cycling, one word per step.
TEXT = (
    "Streams carry an answer to the client piece by piece, as it is made, so that a reader sees the first "
    "words at once; a slow reader pauses the writer, and a reader who has seen enough can cancel."
).split(" ")
SECONDS_PER_WORD = 0.02  # the "inference" time of one word
usage = {"words": 0, "cancelled": 0}  # per process


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000)
    max_words: int = Field(default=50, ge=1, le=10_000)


async def generate(prompt: str, max_words: int) -> Any:
    """The stand-in for a model's token stream: one word every SECONDS_PER_WORD."""
    for i, word in enumerate(itertools.islice(itertools.cycle(TEXT), max_words)):
        await asyncio.sleep(SECONDS_PER_WORD)
        yield word if i == 0 else " " + word


@api.stream("ai.complete", scope="ai:use", rate_limit="10/minute")
async def complete(ctx: Context, data: Prompt) -> Any:
    if data.prompt.strip().lower() == "forbidden topic":
        raise Reject("refused", "the model will not answer that")  # → one error frame, before any chunk
    finished = False
    try:
        async for piece in generate(data.prompt, data.max_words):
            usage["words"] += 1
            yield {"text": piece}
        finished = True
    finally:  # runs however the stream ends: finished, cancelled, timed out, or the client gone
        if not finished:
            usage["cancelled"] += 1


@api.handler("ai.usage")
async def ai_usage(ctx: Context, data: Any) -> Any:
    return dict(usage)


app = api.app  # for `uvicorn examples.completion.app:app --ssl-keyfile … --ssl-certfile …`
