pip install pytest pytest-asyncio
python -m pytest -q --asyncio-mode=auto test_app.py
