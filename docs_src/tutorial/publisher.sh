SECURE_WS_STORAGE_URL=redis://127.0.0.1:6379/0 python publisher.py
