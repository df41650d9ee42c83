"""The uvicorn adapter: the only code of secure_ws that touches uvicorn.

:mod:`.ws_protocol` (our WebSocket protocol, a websockets-sansio subclass),
:mod:`.http_protocol` (httptools with request-head bounds; the TLS context factory),
:mod:`.install` (the hook for plain ``uvicorn secure_ws.main:app``) and
:mod:`.serve` (``secure-ws serve``).
"""
