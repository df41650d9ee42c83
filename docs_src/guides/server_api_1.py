from secure_ws import Publisher

async with Publisher.from_url("redis://redis.internal:6379/0") as publisher:   # the server's SECURE_WS_STORAGE_URL
    await publisher.publish("news", {"title": "hello"})    # {"offset":N,"epoch":E}, or {}
    await publisher.send("alice", {"unread": 3})
    await publisher.disconnect("mallory")
