"""The files the server trusts — the JWK Set, the API keys, the revocations, ``.env`` — on both entry points:
refused when others may write them (at start-up, and on reload, keeping the last good state), bounded in
size, and a Kubernetes Secret's layout (read-only, owned by root, behind ``..data`` links) still works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import (
    Serve,
    Server,
    api_call,
    api_env,
    base_env,
    cli,
    create_api_key,
    refusal,
    rss_kb,
    run,
    unique_sub,
    wait_for,
    welcome,
)

from secure_ws.auth.keys import MAX_JWKS_BYTES
from secure_ws.auth.revocation_file import MAX_FILE_BYTES as MAX_REVOCATION_BYTES

KINDS = pytest.mark.parametrize("kind", [Server, Serve], ids=["uvicorn", "secure-ws serve"])
MIB = 1 << 20


@pytest.fixture
def keys(keydir: Path, tmp_path: Path) -> Path:
    """A copy of the session's key folder: these tests change its files' modes and contents."""
    return Path(shutil.copytree(keydir, tmp_path / "keys"))


@pytest.fixture
def started(keys: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(kind: type[Server], **env: str) -> Server:
        srv = kind(keys, api_env(keys, keys / "api-keys.json", **env)).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def api_key_for() -> Callable[[Path], str]:
    return lambda keys: create_api_key(keys, keys / "api-keys.json", "backend")


def start_fails(kind: type[Server], keys: Path, env: dict[str, str]) -> str:
    """Start a server that must refuse to: exit code 2 and one line, no traceback; its stderr."""
    srv = kind(keys, env)
    result = subprocess.run(srv.argv(), env=env, cwd=keys, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr


def readyz(srv: Server) -> int:
    return srv.get("/readyz")[0]


def token(key: Any, kid: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": "secure-ws", "aud": "secure-ws", "sub": unique_sub(), "iat": now, "exp": now + 600, "jti": unique_sub(), **claims}
    return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": kid})


def intruder() -> tuple[Ed25519PrivateKey, dict[str, Any]]:
    """A key nobody in the deployment made, as another local user would add it to the JWK Set."""
    key = Ed25519PrivateKey.generate()
    jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    return key, {**jwk, "kid": "intruder", "alg": "EdDSA", "use": "sig"}


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` as a new file (a new inode, as editors and atomic writers do) with ``mode``."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


async def accepted(srv: Server, jwt_: str) -> bool:
    try:
        async with srv.connect(jwt_) as ws:
            await welcome(ws)
            return True
    except websockets.ConnectionClosed:
        return False


# -- refused at start-up -----------------------------------------------------------------------------------

TRUST_FILES = {
    "jwks": ("jwks.json", "SECURE_WS_JWKS_FILE"),
    "api-keys": ("api-keys.json", "SECURE_WS_API_KEYS_FILE"),
    "revocations": ("revocations.json", "SECURE_WS_REVOCATION_FILE"),
    ".env": (".env", ".env"),
}


@KINDS
@pytest.mark.parametrize("which", list(TRUST_FILES))
@pytest.mark.parametrize("mode", [0o666, 0o620], ids=["world-writable", "group-writable"])
def test_a_trust_file_others_may_write_stops_start_up(keys, kind, which, mode):
    """A key another local user added to a group- or world-writable JWK Set let a forged token in."""
    name, named = TRUST_FILES[which]
    path = keys / name
    if which == "api-keys":
        create_api_key(keys, path, "backend")
    elif which == "revocations":
        cli(keys, "token", "revoke", "--jti", "some-jti")
    elif which == ".env":
        path.write_text("SECURE_WS_LOG_FORMAT=text\n")
    os.chown(path, -1, 4242)  # a group that is not the owner's own (the test may run as root, whose group is)
    os.chmod(path, mode)
    stderr = start_fails(kind, keys, api_env(keys, keys / "api-keys.json"))
    line = next(line for line in stderr.splitlines() if "configuration error" in line)
    assert named in line and "writable by others" in line and str(path) in line, line
    os.chmod(path, 0o600)  # mended: the same server starts
    srv = kind(keys, api_env(keys, keys / "api-keys.json")).start()
    try:
        assert readyz(srv) == 200
    finally:
        srv.stop()


def test_group_writable_in_the_owners_private_group_is_accepted(keys):
    """A umask of 002 on Debian or Fedora (each user's own group) makes files group-writable harmlessly."""
    import grp
    import pwd

    owner = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(owner.pw_gid)
    if group.gr_mem not in ([], [owner.pw_name]) or any(u.pw_gid == owner.pw_gid and u.pw_uid != owner.pw_uid for u in pwd.getpwall()):
        pytest.skip(f"the test user's group {group.gr_name} is not its own")
    os.chown(keys / "jwks.json", -1, owner.pw_gid)
    os.chmod(keys / "jwks.json", 0o660)
    srv = Serve(keys, base_env(keys)).start()
    try:
        assert readyz(srv) == 200
    finally:
        srv.stop()


@KINDS
def test_a_trust_file_in_a_folder_others_may_write_stops_start_up(keys, kind):
    """Whoever may write the folder may swap the file, whatever the file's own mode."""
    os.chmod(keys, 0o777)
    try:
        stderr = start_fails(kind, keys, base_env(keys))
    finally:
        os.chmod(keys, 0o700)
    assert "SECURE_WS_JWKS_FILE" in stderr and "folder" in stderr and "writable by others" in stderr, stderr


def test_a_fifo_in_place_of_a_trust_file_is_refused_not_waited_on(keys):
    (keys / "jwks.json").unlink()
    os.mkfifo(keys / "jwks.json", 0o600)
    stderr = start_fails(Serve, keys, base_env(keys))
    assert "SECURE_WS_JWKS_FILE" in stderr and "not a regular file" in stderr, stderr


def test_a_relative_path_in_a_start_up_error_is_shown_absolute(keys):
    """`certs/jwks.json not found` said nothing of where it was looked for."""
    stderr = start_fails(Serve, keys, base_env(keys, SECURE_WS_JWKS_FILE="certs/nowhere.json"))
    assert str(keys / "certs" / "nowhere.json") in stderr, stderr


# -- a Kubernetes Secret, and the state volume --------------------------------------------------------------


def kubernetes_secret(folder: Path, files: dict[str, bytes]) -> Path:
    """What the kubelet mounts for a Secret with ``defaultMode: 0440`` and ``fsGroup``: a sticky root folder,
    a timestamped folder holding the files (owned by root, read-only), ``..data`` pointing at it, and each
    name a link through ``..data``."""
    folder.mkdir()
    stamped = folder / "..2026_01_01_00_00_00.000000001"
    stamped.mkdir(mode=0o755)
    for name, data in files.items():
        (stamped / name).write_bytes(data)
        os.chown(stamped / name, 0, 10001)
        os.chmod(stamped / name, 0o440)
        os.symlink(f"..data/{name}", folder / name)
    os.symlink(stamped.name, folder / "..data")
    os.chown(folder, 0, 0)
    os.chmod(folder, 0o1777)
    return folder


@pytest.mark.skipif(os.geteuid() != 0, reason="lays out files owned by root, as the kubelet does")
@KINDS
def test_a_kubernetes_secret_mount_and_an_empty_dir_state_volume_work(keys, tmp_path, kind, issue):
    secret = kubernetes_secret(tmp_path / "secret", {n: (keys / n).read_bytes() for n in ("jwks.json", "server.crt", "server.key")})
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o2777)  # an emptyDir with fsGroup: world-writable, not sticky
    env = base_env(
        keys,
        SECURE_WS_JWKS_FILE=str(secret / "jwks.json"),
        SECURE_WS_TLS_CERTFILE=str(secret / "server.crt"),
        SECURE_WS_TLS_KEYFILE=str(secret / "server.key"),
        # deploy/k8s: the file in a folder of its own on that volume, made 0755 by whoever writes first
        SECURE_WS_REVOCATION_FILE=str(state / "revocations" / "revocations.json"),
    )
    srv = kind(keys, env).start()
    try:
        assert readyz(srv) == 200
        leaked = issue()
        assert run(accepted(srv, leaked))
        jti = jwt.decode(leaked, options={"verify_signature": False})["jti"]
        cli(keys, "token", "revoke", "--jti", jti, env=env)  # `kubectl exec … secure-ws token revoke`
        wait_for(lambda: not run(accepted(srv, leaked)), 5, "the revocation read from the volume")
        assert run(refusal(srv, leaked)) == (1008, "token revoked")
        assert readyz(srv) == 200
    finally:
        srv.stop()


# -- on reload: the last good state is kept, one line, /readyz 503 ------------------------------------------


@KINDS
def test_a_jwks_made_writable_by_others_on_reload_keeps_the_last_good_keys(started, keys, kind, issue):
    srv = started(kind)
    jwks = keys / "jwks.json"
    original = json.loads(jwks.read_bytes())
    key, jwk = intruder()
    forged = token(key, "intruder")
    replace_file(jwks, json.dumps({"keys": [*original["keys"], jwk]}).encode(), 0o666)
    wait_for(lambda: readyz(srv) == 503, 5, "/readyz 503 while the JWK Set is refused")
    assert run(refusal(srv, forged)) == (1008, "invalid token")  # the added key is not used
    assert run(accepted(srv, issue()))  # the keys before it still are
    time.sleep(1.5)  # three polls: still one line (pacing only; the assertion is on the log)
    assert srv.log().count("writable by others") == 1, srv.log()[-3000:]
    os.chmod(jwks, 0o600)  # the operator mends it: used as it is now
    wait_for(lambda: readyz(srv) == 200, 5, "/readyz 200 once the JWK Set is mended")
    assert run(accepted(srv, forged))


@KINDS
def test_a_revocation_file_made_writable_by_others_refuses_handshakes_until_mended(started, keys, kind, issue):
    srv = started(kind)
    cli(keys, "token", "revoke", "--jti", "some-jti")
    wait_for(lambda: readyz(srv) == 200, 5, "/readyz 200")
    os.chmod(keys / "revocations.json", 0o666)  # someone could now take a revocation back
    wait_for(lambda: readyz(srv) == 503, 5, "/readyz 503 while the revocation file is refused")
    assert run(refusal(srv, issue())) == (1013, "service unavailable")
    os.chmod(keys / "revocations.json", 0o600)
    wait_for(lambda: readyz(srv) == 200, 5, "/readyz 200 once mended")
    assert run(accepted(srv, issue()))


@KINDS
def test_an_api_keys_file_made_writable_by_others_refuses_api_calls_until_mended(started, keys, kind):
    api_key = create_api_key(keys, keys / "api-keys.json", "backend")
    srv = started(kind)
    body = {"channel": "a", "data": 1}
    assert api_call(srv, "publish", body, api_key).status_code == 200
    os.chmod(keys / "api-keys.json", 0o666)
    wait_for(lambda: api_call(srv, "publish", body, api_key).status_code == 503, 5, "503 while the keys file is refused")
    os.chmod(keys / "api-keys.json", 0o600)
    wait_for(lambda: api_call(srv, "publish", body, api_key).status_code == 200, 5, "200 once mended")


# -- sizes ---------------------------------------------------------------------------------------------------


def sparse(path: Path, size: int) -> None:
    """A file of ``size`` bytes that costs the test machine nothing (a hole): what the server does with it counts."""
    tmp = path.with_name(path.name + ".new")
    with open(tmp, "wb") as fh:
        fh.truncate(size)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@KINDS
def test_an_oversized_jwks_stops_start_up_without_being_read(keys, kind):
    sparse(keys / "jwks.json", 128 * MIB)
    stderr = start_fails(kind, keys, base_env(keys))
    assert "SECURE_WS_JWKS_FILE" in stderr and f"larger than {MAX_JWKS_BYTES} bytes" in stderr, stderr


@KINDS
@pytest.mark.parametrize("which", ["jwks", "revocations"])
def test_an_oversized_trust_file_on_reload_is_unreadable_and_costs_no_memory(started, keys, kind, which, issue):
    """A 128 MiB file cost 143-256 MiB of server memory at the next poll."""
    srv = started(kind)
    assert run(accepted(srv, issue()))
    before = rss_kb(srv.proc.pid, "VmHWM")
    sparse(keys / TRUST_FILES[which][0], 128 * MIB)
    wait_for(lambda: readyz(srv) == 503, 5, "/readyz 503 while the file is unreadable")
    wait_for(lambda: "larger than" in srv.log(), 5, "the one line saying why")
    grown_mib = (rss_kb(srv.proc.pid, "VmHWM") - before) / 1024
    assert grown_mib < 48, f"{grown_mib:.0f} MiB more for a file it must not read past {MAX_REVOCATION_BYTES} bytes"
    outcome = run(refusal(srv, issue())) if which == "revocations" else None
    assert outcome in (None, (1013, "service unavailable"))


def test_expired_revocations_leave_the_file(keys):
    path = keys / "revocations.json"
    now = time.time()
    path.write_text(json.dumps({"jti": {"expired": now - 10, "live": now + 600}, "sub": {"gone": [now - 700, now - 5]}}))
    os.chmod(path, 0o600)
    cli(keys, "token", "revoke", "--jti", "new")
    document = json.loads(path.read_text())
    assert set(document["jti"]) == {"live", "new"} and document["sub"] == {}, document


def test_a_revocation_that_would_pass_the_bound_is_refused_and_the_file_kept(keys, started, api_key_for):
    """The cap is also enforced where the file is written: a file the servers would refuse is never written."""
    from secure_ws.files import json_bytes

    path = keys / "revocations.json"
    until = time.time() + 3600
    ident = "j" * 200

    def document(n: int) -> dict[str, Any]:
        return {"jti": {f"{ident}{i:08d}": until for i in range(n)}, "sub": {}}

    entry = len(json_bytes(document(2))) - len(json_bytes(document(1)))
    n = 1 + (MAX_REVOCATION_BYTES - len(json_bytes(document(1)))) // entry  # just under the bound: no room for one more
    data = json_bytes(document(n))
    assert MAX_REVOCATION_BYTES - entry < len(data) <= MAX_REVOCATION_BYTES
    path.write_bytes(data)
    os.chmod(path, 0o600)
    key = api_key_for(keys)
    srv = started(Server)
    assert readyz(srv) == 200  # a full file is a readable one
    result = cli(keys, "token", "revoke", "--jti", "x" * 200, check=False)
    assert result.returncode == 1 and "revoke the subject (--sub)" in result.stderr, result.stderr
    response = api_call(srv, "revoke", {"jti": "y" * 200}, key)
    assert response.status_code == 507 and response.json()["error"]["code"] == "too_many_revocations", response.text
    assert path.read_bytes() == data
    assert "Traceback" not in srv.log()
