await client.subscribe("notes.board", since=saved)  # every message after it, then the live ones
