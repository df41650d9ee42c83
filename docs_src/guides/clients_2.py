async def reload(channel: str) -> None:
    state[channel] = await fetch_snapshot(channel)          # your own API

client = Client(url, get_token, ssl=tls, on_message=apply, on_recovery_failed=reload)
