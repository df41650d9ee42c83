"""``secure_ws.main:app`` as it runs under a uvicorn version our protocol subclasses were not tested
with: uvicorn's version is made to read as one we do not know before secure_ws is imported."""

import uvicorn

uvicorn.__version__ = "0.999.0"

from secure_ws.main import app  # noqa: E402

__all__ = ["app"]
