"""What goes over the wire, with no I/O and no imports of secure_ws's own: RFC 6455 framing
(:mod:`.framing`) and the JSON message schema (:mod:`.messages`). The Python client needs only this."""
