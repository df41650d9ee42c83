"""Applications built on secure_ws, run from the repository root (``uvicorn examples.chat.app:app …``)."""
