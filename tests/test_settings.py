"""SPEC §2 configuration: a bad value stops start-up with one clear line naming the variable.

Start-up is exercised as an operator would run it (``python -m uvicorn secure_ws.main:app`` and
``python -m secure_ws serve`` in a subprocess); ``.env`` handling is checked on a real server
through the welcome frame; ``load_settings`` is also checked directly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Server, base_env, free_port, run, welcome

from secure_ws.settings import ConfigError, load_settings

SECRET_32 = "s" * 32


def start_failure(keydir: Path, cwd: Path, env: dict[str, str], how: str = "uvicorn") -> tuple[int, str]:
    """Start the server with ``env`` and expect it to stop by itself; return (exit code, all output)."""
    port = str(free_port())
    if how == "uvicorn":
        command = [
            sys.executable, "-m", "uvicorn", "secure_ws.main:app", "--host", "127.0.0.1", "--port", port,
            "--ssl-keyfile", str(keydir / "server.key"), "--ssl-certfile", str(keydir / "server.crt"),
        ]
    else:
        command = [sys.executable, "-m", "secure_ws", "serve", "--host", "127.0.0.1", "--port", port]
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the server started despite the bad value (still running after 30 s):\n{out}{err}") from None
    return proc.returncode, out + err


# uvicorn's own `INFO:     …`, or ours: `2026-12-04T17:31:33.123Z WARNING  secure_ws.keys …`
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+Z\s+)?(WARNING|INFO)\b")


def assert_one_clear_line(code: int, output: str, variable: str, context_lines: bool = False) -> str:
    """Exit non-zero, no traceback, exactly one line, naming ``variable``.

    ``context_lines``: log lines (``LEVEL: …``) that explain the error may precede it.
    """
    assert code != 0, f"exit code 0 for a bad {variable}:\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    if context_lines:
        lines = [line for line in lines if not LOG_LINE.match(line)]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{output}"
    assert variable in lines[0], f"the line does not name {variable}: {lines[0]!r}"
    assert len(lines[0]) < 400, lines[0]
    return lines[0]


def bad_jwks_file(tmp: Path, content: str) -> str:
    path = tmp / "bad-jwks.json"
    path.write_text(content)
    return str(path)


# (id, variable expected in the line, extra env; "{tmp}" in a value is replaced by a scratch folder)
BAD_VALUES = [
    ("rate-banana", "SECURE_WS_RATE_LIMIT", {"SECURE_WS_RATE_LIMIT": "banana"}),
    ("rate-partly-banana", "SECURE_WS_RATE_LIMIT", {"SECURE_WS_RATE_LIMIT": "5/second;banana"}),
    ("rate-unknown-unit", "SECURE_WS_RATE_LIMIT", {"SECURE_WS_RATE_LIMIT": "20/fortnight"}),
    ("strategy-leaky", "SECURE_WS_RATE_LIMIT_STRATEGY", {"SECURE_WS_RATE_LIMIT_STRATEGY": "leaky"}),
    ("close-after-abc", "SECURE_WS_RATE_LIMIT_CLOSE_AFTER", {"SECURE_WS_RATE_LIMIT_CLOSE_AFTER": "abc"}),
    ("close-after-negative", "SECURE_WS_RATE_LIMIT_CLOSE_AFTER", {"SECURE_WS_RATE_LIMIT_CLOSE_AFTER": "-1"}),
    ("handshake-banana", "SECURE_WS_HANDSHAKE_RATE_LIMIT", {"SECURE_WS_HANDSHAKE_RATE_LIMIT": "banana"}),
    ("alg-unknown", "SECURE_WS_JWT_ALGORITHMS", {"SECURE_WS_JWT_ALGORITHMS": "XX999"}),
    ("alg-none", "SECURE_WS_JWT_ALGORITHMS", {"SECURE_WS_JWT_ALGORITHMS": "none"}),
    ("alg-none-mixed", "SECURE_WS_JWT_ALGORITHMS", {"SECURE_WS_JWT_ALGORITHMS": "EdDSA,none"}),
    ("alg-None-case", "SECURE_WS_JWT_ALGORITHMS", {"SECURE_WS_JWT_ALGORITHMS": "EdDSA,None"}),
    ("hs-secret-short", "SECURE_WS_JWT_SECRET", {"SECURE_WS_JWT_ALGORITHMS": "HS256", "SECURE_WS_JWT_SECRET": "short"}),
    ("hs-secret-31-bytes", "SECURE_WS_JWT_SECRET",
     {"SECURE_WS_JWT_ALGORITHMS": "HS256", "SECURE_WS_JWT_SECRET": "s" * 31}),
    ("hs-without-secret", "SECURE_WS_JWT_SECRET", {"SECURE_WS_JWT_ALGORITHMS": "HS256"}),
    ("jwks-missing", "SECURE_WS_JWKS_FILE", {"SECURE_WS_JWKS_FILE": "{tmp}/no-such-jwks.json"}),
    ("jwks-not-json", "SECURE_WS_JWKS_FILE", {"SECURE_WS_JWKS_FILE": "{tmp}/not-json"}),
    ("jwks-not-a-jwk-set", "SECURE_WS_JWKS_FILE", {"SECURE_WS_JWKS_FILE": "{tmp}/not-a-set"}),
    ("jwks-no-key-for-allowed-algs", "SECURE_WS_JWKS_FILE", {"SECURE_WS_JWT_ALGORITHMS": "RS256"}),
    ("max-bytes-abc", "SECURE_WS_MAX_MESSAGE_BYTES", {"SECURE_WS_MAX_MESSAGE_BYTES": "abc"}),
    ("max-bytes-negative", "SECURE_WS_MAX_MESSAGE_BYTES", {"SECURE_WS_MAX_MESSAGE_BYTES": "-5"}),
    ("max-conn-abc", "SECURE_WS_MAX_CONNECTIONS_PER_CLIENT", {"SECURE_WS_MAX_CONNECTIONS_PER_CLIENT": "ten"}),
    ("leeway-abc", "SECURE_WS_JWT_LEEWAY_SECONDS", {"SECURE_WS_JWT_LEEWAY_SECONDS": "soon"}),
    ("storage-ftp", "SECURE_WS_STORAGE_URL", {"SECURE_WS_STORAGE_URL": "ftp://x"}),
    ("storage-sentinel-no-service", "SECURE_WS_STORAGE_URL", {"SECURE_WS_STORAGE_URL": "redis+sentinel://:pw@h1:26379,h2:26379"}),
    ("storage-cluster-db", "SECURE_WS_STORAGE_URL", {"SECURE_WS_STORAGE_URL": "redis+cluster://h1:7000,h2:7001/3"}),
    ("log-xml", "SECURE_WS_LOG_FORMAT", {"SECURE_WS_LOG_FORMAT": "xml"}),
    ("origin-with-path", "SECURE_WS_ALLOWED_ORIGINS", {"SECURE_WS_ALLOWED_ORIGINS": "https://app.example.com/path"}),
    ("origin-with-path-in-list", "SECURE_WS_ALLOWED_ORIGINS",
     {"SECURE_WS_ALLOWED_ORIGINS": "https://ok.example.com,https://app.example.com/x"}),
    ("tls-min-1.1", "SECURE_WS_TLS_MIN_VERSION", {"SECURE_WS_TLS_MIN_VERSION": "1.1"}),
    ("history-size-abc", "SECURE_WS_HISTORY_SIZE", {"SECURE_WS_HISTORY_SIZE": "lots"}),
    ("history-size-negative", "SECURE_WS_HISTORY_SIZE", {"SECURE_WS_HISTORY_SIZE": "-1"}),
    ("history-size-huge", "SECURE_WS_HISTORY_SIZE", {"SECURE_WS_HISTORY_SIZE": "10001"}),
    ("history-ttl-soon", "SECURE_WS_HISTORY_TTL", {"SECURE_WS_HISTORY_TTL": "soon"}),
    ("history-max-bytes-tiny", "SECURE_WS_HISTORY_MAX_BYTES", {"SECURE_WS_HISTORY_MAX_BYTES": "100"}),
    ("stream-timeout-soon", "SECURE_WS_STREAM_TIMEOUT", {"SECURE_WS_STREAM_TIMEOUT": "soon"}),
    ("stream-timeout-zero", "SECURE_WS_STREAM_TIMEOUT", {"SECURE_WS_STREAM_TIMEOUT": "0"}),
]


def materialize(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    (tmp / "not-json").write_text("this is { not json")
    (tmp / "not-a-set").write_text(json.dumps({"keys": "nope"}))
    return {k: v.replace("{tmp}", str(tmp)) for k, v in extra.items()}


@pytest.mark.parametrize("variable,extra", [pytest.param(v, e, id=i) for i, v, e in BAD_VALUES])
def test_bad_value_stops_uvicorn_with_one_line(keydir, tmp_path, variable, extra):
    env = base_env(keydir, **materialize(tmp_path, extra))
    code, output = start_failure(keydir, tmp_path, env)
    # Which keys were skipped, and why, may be logged before the error line for this one.
    assert_one_clear_line(code, output, variable, context_lines=variable == "SECURE_WS_JWKS_FILE")


SERVE_CASES = ["rate-banana", "alg-none", "hs-secret-short", "jwks-missing", "storage-ftp", "storage-sentinel-no-service", "tls-min-1.1"]


@pytest.mark.parametrize(
    "variable,extra", [pytest.param(v, e, id=i) for i, v, e in BAD_VALUES if i in SERVE_CASES]
)
def test_bad_value_stops_secure_ws_serve_with_one_line(keydir, tmp_path, variable, extra):
    env = base_env(keydir, **materialize(tmp_path, extra))
    code, output = start_failure(keydir, tmp_path, env, how="serve")
    assert_one_clear_line(code, output, variable)


def test_the_secret_never_appears_in_the_error_line(keydir, tmp_path):
    secret = "do-not-print-me-" + "x" * 8  # 24 bytes: too short
    env = base_env(keydir, SECURE_WS_JWT_ALGORITHMS="HS256", SECURE_WS_JWT_SECRET=secret)
    code, output = start_failure(keydir, tmp_path, env)
    assert_one_clear_line(code, output, "SECURE_WS_JWT_SECRET")
    assert secret not in output


def test_bad_value_in_dotenv_stops_start_up(keydir, tmp_path):
    (tmp_path / ".env").write_text("SECURE_WS_RATE_LIMIT=banana\n")
    code, output = start_failure(keydir, tmp_path, base_env(keydir))
    assert_one_clear_line(code, output, "SECURE_WS_RATE_LIMIT")


# -- .env on a real server -------------------------------------------------------------------------


@pytest.fixture
def envdir(keydir, tmp_path):
    """A working directory of its own (for a ``.env``), with the TLS files the harness expects."""
    for name in ("server.key", "server.crt", "ca.crt"):
        shutil.copy(keydir / name, tmp_path / name)
    return tmp_path


def served_rate_limit(keydir: Path, envdir: Path, issue, **extra: str) -> str:
    srv = Server(envdir, base_env(keydir, **extra)).start()
    try:
        async def go():
            async with srv.connect(issue()) as ws:
                return (await welcome(ws))["rate_limit"]

        return run(go())
    finally:
        srv.stop()


def test_dotenv_in_working_directory_is_read(keydir, envdir, issue):
    (envdir / ".env").write_text('# settings for this host\n\nSECURE_WS_RATE_LIMIT="7/minute"\n')
    assert served_rate_limit(keydir, envdir, issue) == "7/minute"


def test_real_environment_wins_over_dotenv(keydir, envdir, issue):
    (envdir / ".env").write_text("SECURE_WS_RATE_LIMIT=7/minute\n")
    assert served_rate_limit(keydir, envdir, issue, SECURE_WS_RATE_LIMIT="9/minute") == "9/minute"


def test_real_environment_overrides_a_bad_dotenv_value(keydir, envdir, issue):
    (envdir / ".env").write_text("SECURE_WS_RATE_LIMIT=banana\n")
    assert served_rate_limit(keydir, envdir, issue, SECURE_WS_RATE_LIMIT="8/minute") == "8/minute"


def test_without_dotenv_the_default_applies(keydir, envdir, issue):
    assert served_rate_limit(keydir, envdir, issue) == "20/second"


def test_dotenv_export_prefix_is_read(keydir, envdir, issue):
    """Issue 13: `export X=…` (a .env that is also sourced by a shell) was silently ignored."""
    (envdir / ".env").write_text("export SECURE_WS_RATE_LIMIT=5/second\n")
    assert served_rate_limit(keydir, envdir, issue) == "5/second"


def test_dotenv_trailing_comment_is_not_part_of_the_value(keydir, envdir, issue):
    """Issue 13: `…=5/second  # five` was refused as a bad rate limit."""
    (envdir / ".env").write_text("SECURE_WS_RATE_LIMIT=5/second  # five a second\nSECURE_WS_JWT_ISSUER='secure-ws'  # quoted\n")
    assert served_rate_limit(keydir, envdir, issue) == "5/second"


def test_dotenv_line_that_cannot_be_parsed_stops_start_up_naming_the_line(keydir, tmp_path):
    (tmp_path / ".env").write_text("# ok\nSECURE_WS_RATE_LIMIT=5/second\nthis line is not an assignment\n")
    for how in ("uvicorn", "serve"):
        code, output = start_failure(keydir, tmp_path, base_env(keydir), how=how)
        line = assert_one_clear_line(code, output, ".env")
        assert "line 3" in line, line
        assert "not an assignment" not in line, "the line itself may hold a secret: only its number is shown"


def test_misspelt_variable_is_warned_about_with_the_nearest_name(keydir, envdir, issue):
    """Issue 13: a misspelt SECURE_WS_RATELIMIT was silently ignored."""
    (envdir / ".env").write_text("SECURE_WS_RATELIMIT=5/second\n")
    srv = Server(envdir, base_env(keydir, SECURE_WS_MAX_CONECTIONS_PER_CLIENT="3")).start()
    try:
        async def go():
            async with srv.connect(issue()) as ws:
                return (await welcome(ws))["rate_limit"]

        assert run(go()) == "20/second"  # ignored, as warned
        log = srv.log()
    finally:
        srv.stop()
    [dotenv_line] = [line for line in log.splitlines() if "SECURE_WS_RATELIMIT" in line]
    assert "WARNING" in dotenv_line and "did you mean SECURE_WS_RATE_LIMIT?" in dotenv_line, dotenv_line
    [env_line] = [line for line in log.splitlines() if "SECURE_WS_MAX_CONECTIONS_PER_CLIENT" in line]
    assert "did you mean SECURE_WS_MAX_CONNECTIONS_PER_CLIENT?" in env_line, env_line


# -- load_settings directly -----------------------------------------------------------------------


def test_defaults_match_the_spec():
    s = load_settings(environ={}, env_file=None)
    assert s.jwks_file == Path("certs/jwks.json")
    assert s.signing_keys_file == Path("certs/signing-keys.json")
    assert s.jwks_url is None
    assert s.algorithms == ("EdDSA", "ES256", "RS256")
    assert s.jwt_secret is None
    assert (s.issuer, s.audience, s.leeway) == ("secure-ws", "secure-ws", 30)
    assert s.rate_limit == "20/second"
    assert s.rate_limit_strategy == "sliding-window"
    assert s.rate_limit_close_after == 10
    assert s.handshake_rate_limit == "60/minute"
    assert s.max_connections_per_client == 10
    assert s.max_message_bytes == 65536
    assert s.allowed_origins == frozenset()
    assert s.storage_url == "memory://"
    assert (s.tls_certfile, s.tls_keyfile) == (Path("certs/server.crt"), Path("certs/server.key"))
    assert s.tls_min_version == "1.2"
    assert s.log_format == "text"
    assert (s.history_size, s.history_ttl, s.history_max_bytes, s.history) == (100, 300, 64 * 1024 * 1024, True)


@pytest.mark.parametrize("size,ttl,on", [("0", "5m", False), ("100", "0", False), ("1", "90s", True)])
def test_history_is_off_when_its_size_or_ttl_is_zero(size, ttl, on):
    settings = load_settings(environ={"SECURE_WS_HISTORY_SIZE": size, "SECURE_WS_HISTORY_TTL": ttl}, env_file=None)
    assert settings.history is on


def test_load_settings_ignores_the_process_environment_when_given_one(monkeypatch):
    monkeypatch.setenv("SECURE_WS_RATE_LIMIT", "banana")
    assert load_settings(environ={}, env_file=None).rate_limit == "20/second"


@pytest.mark.parametrize(
    "variable,extra",
    [pytest.param(v, e, id=i) for i, v, e in BAD_VALUES if not i.startswith("jwks-")],
)
def test_load_settings_names_the_variable(variable, extra):
    with pytest.raises(ConfigError) as info:
        load_settings(environ=extra, env_file=None)
    assert variable in str(info.value)
    assert "\n" not in str(info.value)


def test_hs_secret_of_32_bytes_is_enough():
    s = load_settings(environ={"SECURE_WS_JWT_ALGORITHMS": "HS256", "SECURE_WS_JWT_SECRET": SECRET_32}, env_file=None)
    assert s.jwt_secret == SECRET_32.encode() and s.algorithms == ("HS256",)


def test_secret_is_measured_in_bytes():
    # 11 characters of 3 bytes each: 33 bytes, enough; 10 of them (30 bytes) are not.
    ok = load_settings(environ={"SECURE_WS_JWT_ALGORITHMS": "HS256", "SECURE_WS_JWT_SECRET": "✓" * 11}, env_file=None)
    assert ok.jwt_secret == ("✓" * 11).encode()
    with pytest.raises(ConfigError, match="SECURE_WS_JWT_SECRET"):
        load_settings(environ={"SECURE_WS_JWT_ALGORITHMS": "HS256", "SECURE_WS_JWT_SECRET": "✓" * 10}, env_file=None)


def test_secret_not_shown_in_settings_repr():
    s = load_settings(environ={"SECURE_WS_JWT_ALGORITHMS": "HS256", "SECURE_WS_JWT_SECRET": SECRET_32}, env_file=None)
    assert SECRET_32 not in repr(s)


@pytest.mark.parametrize("value,count", [("20/second", 1), ("100/second;3/minute", 2), ("5/2seconds", 1)])
def test_rate_limit_notation(value, count):
    s = load_settings(environ={"SECURE_WS_RATE_LIMIT": value}, env_file=None)
    assert s.rate_limit == value and len(s.rate_limits) == count


@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
def test_each_strategy_is_accepted(strategy):
    assert load_settings(environ={"SECURE_WS_RATE_LIMIT_STRATEGY": strategy}, env_file=None).rate_limit_strategy == strategy


@pytest.mark.parametrize(
    "value,expected",
    [
        ("*", {"*"}),
        ("https://app.example.com", {"https://app.example.com"}),
        ("https://a.example.com, http://localhost:3000", {"https://a.example.com", "http://localhost:3000"}),
    ],
)
def test_allowed_origins_accepted(value, expected):
    assert load_settings(environ={"SECURE_WS_ALLOWED_ORIGINS": value}, env_file=None).allowed_origins == expected


@pytest.mark.parametrize("url", [
    "memory://", "redis://localhost:6379/0", "rediss://cache.example.com:6380/2",
    "redis+sentinel://:pw@s1:26379,s2:26379,s3:26379/mymaster/1", "redis+cluster://c1:7000,c2:7001",
    "rediss+sentinel://s1:26379/mymaster?ssl_ca_certs=/etc/ca.pem", "rediss+cluster://c1:7000?ssl_ca_certs=/etc/ca.pem",
])
def test_storage_urls_accepted(url):
    assert load_settings(environ={"SECURE_WS_STORAGE_URL": url}, env_file=None).storage_url == url


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("SECURE_WS_RATE_LIMIT=7/minute\nSECURE_WS_LOG_FORMAT='json'\n")
    s = load_settings(environ={}, env_file=env_file)
    assert (s.rate_limit, s.log_format) == ("7/minute", "json")
    s = load_settings(environ={"SECURE_WS_RATE_LIMIT": "9/minute"}, env_file=env_file)
    assert (s.rate_limit, s.log_format) == ("9/minute", "json")


def test_missing_env_file_is_fine(tmp_path):
    assert load_settings(environ={}, env_file=tmp_path / "absent.env").rate_limit == "20/second"


def test_dotenv_syntax_in_load_settings(tmp_path):
    env = tmp_path / ".env"
    env.write_text(
        "export SECURE_WS_RATE_LIMIT=5/second  # five\n"
        'SECURE_WS_JWT_ISSUER="issuer # with a hash"\n'
        "SECURE_WS_JWT_AUDIENCE='literal $HOME'\n"
        "SECURE_WS_HANDSHAKE_RATE_LIMIT=7/minute#no space: part of the value is refused below\n"
    )
    with pytest.raises(ConfigError, match="SECURE_WS_HANDSHAKE_RATE_LIMIT"):
        load_settings(environ={}, env_file=env)
    s = load_settings(environ={"SECURE_WS_HANDSHAKE_RATE_LIMIT": "7/minute"}, env_file=env)
    assert (s.rate_limit, s.issuer, s.audience) == ("5/second", "issuer # with a hash", "literal $HOME")


def test_unknown_variables_are_warnings_not_errors():
    s = load_settings(environ={"SECURE_WS_STORAGE_URI": "redis://x", "SECURE_WS_COMPLETELY_ELSE": "1"}, env_file=None)
    assert s.storage_url == "memory://"
    assert any("SECURE_WS_STORAGE_URI" in w and "did you mean SECURE_WS_STORAGE_URL?" in w for w in s.warnings), s.warnings
    assert any("SECURE_WS_COMPLETELY_ELSE" in w and ".env.example" in w for w in s.warnings), s.warnings
    assert load_settings(environ={"SECURE_WS_RATE_LIMIT": "5/second"}, env_file=None).warnings == ()


def test_env_example_names_only_real_variables():
    """.env.example copied to .env as is must start without a warning (and with the defaults)."""
    s = load_settings(environ={}, env_file=Path(__file__).resolve().parent.parent / ".env.example")
    assert s.warnings == ()
    assert s == load_settings(environ={}, env_file=None)
