"""A backend pushes through the server API: KEY=$(secure-ws apikey create backend) python push.py"""

import os

import httpx

BASE = os.environ.get("BASE", "https://localhost:8443")


def main() -> None:
    with httpx.Client(base_url=BASE, verify="certs/ca.crt", headers={"Authorization": "Bearer " + os.environ["KEY"]}) as http:
        print(http.post("/api/publish", json={"channel": "notes.board", "data": {"text": "from the backend"}}).json())
        print(http.post("/api/send", json={"sub": "alice", "data": {"unread": 3}}).json())


if __name__ == "__main__":
    main()
