"""A Python backend that shares the servers' Redis pushes with no HTTP at all."""

import asyncio
import os

from secure_ws import Publisher


async def main() -> None:
    async with Publisher.from_url(os.environ["SECURE_WS_STORAGE_URL"]) as publisher:
        print(await publisher.publish("notes.board", {"text": "from a worker of ours"}))
        await publisher.send("alice", {"unread": 4})


if __name__ == "__main__":
    asyncio.run(main())
