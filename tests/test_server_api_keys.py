"""SPEC §10 API keys: ``secure-ws apikey create|list|revoke`` through the real ``python -m secure_ws``, the file
they write (0600, hashes only), and a running server picking every change up within 2 s — never failing open."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from helpers import Server, api_call, api_env, api_error, cli, create_api_key, no_traceback, refusal_lines, wait_for

BODY = {"channel": "room.a", "data": 1}


def status_with(srv: Server, key: str) -> int:
    return api_call(srv, "publish", BODY, key).status_code


def test_apikey_commands_write_only_hashes_0600(keydir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    env = api_env(keydir, keys_file)
    created = cli(keydir, "apikey", "create", "billing", env=env)
    key = created.stdout.strip()
    assert created.stdout == key + "\n"  # the key alone on stdout, for `KEY=$(secure-ws apikey create …)`
    assert key.startswith("swk_") and len(key) >= 4 + 43
    assert "only time" in created.stderr and key not in created.stderr
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    text = keys_file.read_text()
    assert key not in text and key[4:] not in text
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert json.loads(text)["keys"]["billing"]["sha256"] == digest

    other = create_api_key(keydir, keys_file, "search")
    assert other != key
    listed = cli(keydir, "apikey", "list", env=env)
    assert "billing" in listed.stdout and "search" in listed.stdout
    for secret in (key, other, digest, hashlib.sha256(other.encode()).hexdigest()):
        assert secret not in listed.stdout + listed.stderr

    again = cli(keydir, "apikey", "create", "billing", env=env, check=False)
    assert again.returncode == 2 and len(refusal_lines(again.stderr)) == 1 and "exists" in again.stderr
    assert json.loads(keys_file.read_text())["keys"]["billing"]["sha256"] == digest  # not replaced
    for bad_name in ("has space", "", "x" * 65, "-dash"):
        refused = cli(keydir, "apikey", "create", "--", bad_name, env=env, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr

    cli(keydir, "apikey", "revoke", "billing", env=env)
    assert set(json.loads(keys_file.read_text())["keys"]) == {"search"}
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    unknown = cli(keydir, "apikey", "revoke", "billing", env=env, check=False)
    assert unknown.returncode == 2 and "no key named" in unknown.stderr


def test_a_running_server_picks_up_created_revoked_and_broken_keys_within_2s(keydir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    env = api_env(keydir, keys_file)
    first = create_api_key(keydir, keys_file, "first")
    srv = Server(keydir, env).start()
    try:
        assert status_with(srv, first) == 200

        second = create_api_key(keydir, keys_file, "second")
        wait_for(lambda: status_with(srv, second) == 200, 2.0, "a created key works")
        cli(keydir, "apikey", "revoke", "second", env=env)
        wait_for(lambda: status_with(srv, second) == 401, 2.0, "a revoked key is refused")
        assert status_with(srv, first) == 200

        # A file that can no longer be read: every call refused, the right key included (never fail open).
        good = keys_file.read_bytes()
        keys_file.write_text('{"keys": {"first": ')
        wait_for(lambda: status_with(srv, first) == 503, 2.0, "a corrupt keys file refuses every call")
        api_error(api_call(srv, "publish", BODY, first), 503, "unavailable")
        assert api_call(srv, "publish", BODY).status_code == 503  # no key at all: still no way in
        assert "SECURE_WS_API_KEYS_FILE" in srv.log()
        keys_file.write_bytes(good)
        wait_for(lambda: status_with(srv, first) == 200, 2.0, "the repaired file is used again")

        if os.geteuid() != 0:  # root reads anything: the mode cannot make it unreadable
            keys_file.chmod(0)
            wait_for(lambda: status_with(srv, first) == 503, 2.0, "an unreadable keys file refuses every call")
            keys_file.chmod(0o600)
            wait_for(lambda: status_with(srv, first) == 200, 2.0, "the readable file is used again")

        # The last key revoked: no key, no API.
        cli(keydir, "apikey", "revoke", "first", env=env)
        wait_for(lambda: status_with(srv, first) == 404, 2.0, "without keys /api is 404")
        third = create_api_key(keydir, keys_file, "third")
        wait_for(lambda: status_with(srv, third) == 200, 2.0, "a new key opens the API again")
        keys_file.unlink()
        wait_for(lambda: status_with(srv, third) == 404, 2.0, "without a keys file /api is 404")
        no_traceback(srv)
        log = srv.log()
        assert first not in log and second not in log and third not in log
    finally:
        srv.stop()


def test_an_unusable_keys_file_stops_start_up_with_one_line(keydir: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys.json"
    for content in ("{not json", '{"keys": []}', '{"keys": {"a": {"sha256": "short"}}}'):
        keys_file.write_text(content)
        srv = Server(keydir, api_env(keydir, keys_file))
        try:
            srv.start()
        except RuntimeError as exc:
            message = str(exc)
        else:
            srv.stop()
            raise AssertionError(f"started with an API keys file holding {content!r}")
        assert "configuration error: SECURE_WS_API_KEYS_FILE" in message, message
        assert "Traceback" not in message, message


def test_an_api_key_pasted_into_a_log_line_is_redacted(keydir: Path, tmp_path: Path) -> None:
    from secure_ws.logs import redact

    key = create_api_key(keydir, tmp_path / "api-keys.json", "pasted")
    line = redact(f"GET /api/publish?key={key} and again Authorization: Token {key}")
    assert key not in line and key[4:] not in line and "swk_[redacted]" in line
