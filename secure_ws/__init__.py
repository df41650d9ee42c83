"""secure_ws: an authenticated, rate-limited WebSocket API service over wss."""

__version__ = "0.1.0"
