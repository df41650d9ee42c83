cp "$(python -c "import secure_ws, pathlib; print(pathlib.Path(secure_ws.__file__).parent / 'static/secure-ws-client.js')")" .
python -m http.server 8000 --bind 127.0.0.1   # then open http://localhost:8000/page.html#token=$TOKEN
