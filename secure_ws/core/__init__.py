"""The service's behaviour, on narrow interfaces: :mod:`.handshake`, :mod:`.session` (one connection),
:mod:`.hub` (this process's connections), :mod:`.ratelimit`, and :mod:`.handlers` (the dispatch table
every message type, built-in or the application's, is registered on)."""
