"""A chat with rooms on secure_ws: see app.py and the README section "Your own API: handlers"."""
