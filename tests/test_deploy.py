"""deploy/: what can be checked without an image registry or a cluster, checked for real.

- Dockerfile: its build-stage RUN commands run from a fresh venv made by this test exactly as the image
  makes it (paths mapped into a temp dir), and its ENTRYPOINT/CMD and HEALTHCHECK commands run from there,
  with its ENV, against mounted key files: the lines are parsed from the Dockerfile, so they cannot drift.
- systemd unit: ``systemd-analyze verify`` (where installed) and the directives that make it hardened.
- compose.yaml and k8s/: parsed as YAML, the fields that matter checked, the arguments parsed by the CLI.
- Prometheus: ``promtool check rules`` / ``promtool test rules`` on the alerts, the dashboard's queries
  checked by promtool too, and a real Prometheus scraping a real 2-worker ``secure-ws serve``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, Serve, Server, base_env, free_port, run, scrape, wait_for, welcome

from secure_ws.cli import build_parser
from secure_ws.uvicorn.serve import GRACEFUL_SHUTDOWN_SECONDS

DEPLOY = ROOT / "deploy"
IMAGE_PREFIX = "/opt/secure-ws"  # where the Dockerfile puts the venv
SECRETS = "/run/secrets/secure-ws"  # where keys and certificates are mounted
STATE = "/var/lib/secure-ws"


def known_variables() -> set[str]:
    """Every SECURE_WS_* variable there is (.env.example lists them all)."""
    return set(re.findall(r"^#?\s*(SECURE_WS_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))


def serve_args(args: list[str]) -> Any:
    """What `secure-ws serve` makes of these arguments (argparse exits 2 on any it does not know)."""
    return build_parser().parse_args(["serve", *args])


# -- the Dockerfile ---------------------------------------------------------------------------------------


def dockerfile() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each a list of (INSTRUCTION, arguments), continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        instruction, _, arguments = (logical + line).strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for instruction, arguments in stage if instruction == name]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not exec form: {arguments}"
    return value


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in instructions(stage, "ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    (arguments,) = instructions(stage, "HEALTHCHECK")
    return exec_form(arguments[arguments.index("CMD ") + 4:])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The image's venv, built by the Dockerfile's own build-stage COPY and RUN lines into a temp root."""
    build, runtime = dockerfile()[0], dockerfile()[-1]
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    src.mkdir()
    for arguments in instructions(build, "COPY"):
        *sources, target = shlex.split(arguments)
        for source in sources:
            origin = ROOT / source
            destination = src / target / source if target.endswith("/") else src / target
            if origin.is_dir():
                shutil.copytree(origin, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, destination)
    prefix = root / "opt" / "secure-ws"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(env_of(build))
    env.pop("PIP_NO_CACHE_DIR", None)  # the image keeps no pip cache; here the cache only saves downloads
    # `python` is the base image's interpreter: here the one running the tests (venv made from its base).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for command in instructions(build, "RUN"):
        result = subprocess.run(
            ["sh", "-c", command.replace(IMAGE_PREFIX, str(prefix))], cwd=src, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"RUN {command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return {"root": root, "prefix": prefix, "runtime": runtime}


def image_env(image: dict[str, Any], secrets: Path, state: Path) -> dict[str, str]:
    """The runtime stage's ENV, its paths mapped into the test's directories; nothing of the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECURE_WS_", "PYTHON", "VIRTUAL_ENV"))}
    for name, value in env_of(image["runtime"]).items():
        value = value.replace(IMAGE_PREFIX, str(image["prefix"])).replace(SECRETS, str(secrets)).replace(STATE, str(state))
        env[name] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


def test_dockerfile_shape():
    stages = dockerfile()
    assert len(stages) >= 2, "multi-stage: the runtime stage has no build tools or pip cache"
    for stage in stages:
        assert re.search(r"python:3\.1[1-9]-slim", stage[0][1]), stage[0]
    runtime = stages[-1]
    (user,) = instructions(runtime, "USER")
    assert user.split(":")[0] not in ("0", "root"), "runs as root"
    for stage in stages:
        for arguments in instructions(stage, "COPY") + instructions(stage, "ADD"):
            for secret in ("certs", ".key", ".crt", "jwks", "signing-keys", ".env"):
                assert secret not in arguments, f"key material copied into the image: COPY {arguments}"
    assert all(a.startswith("--from=") for a in instructions(runtime, "COPY")), "the runtime stage copies only the built venv"
    entrypoint = exec_form(instructions(runtime, "ENTRYPOINT")[0])
    command = exec_form(instructions(runtime, "CMD")[0])
    assert entrypoint == ["secure-ws", "serve"]
    assert serve_args(command).host == "0.0.0.0"
    assert "/healthz" in " ".join(healthcheck_command(runtime))
    env = env_of(runtime)
    for name, value in env.items():
        if name.startswith("SECURE_WS_"):
            assert name in known_variables(), name
            if name.endswith("FILE"):
                assert value.startswith((SECRETS + "/", STATE + "/")), f"{name}={value}: neither mounted secret nor state volume"
    assert "SECURE_WS_SIGNING_KEYS_FILE" not in env, "the server never reads the private signing keys"
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*", ".dockerignore must exclude everything by default"
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    copied = {source for a in instructions(stages[0], "COPY") for source in shlex.split(a)[:-1]}
    assert copied <= allowed, f"COPY needs {copied - allowed}, which .dockerignore keeps out"
    assert not {"certs", ".env", ".git", ".venv"} & allowed


def test_image_commands_run_from_a_fresh_venv(image, keydir, issue, tmp_path):
    runtime = image["runtime"]
    secrets, state = tmp_path / "secrets", tmp_path / "state"
    secrets.mkdir(mode=0o700)
    state.mkdir(mode=0o750)
    for name in ("server.crt", "server.key", "jwks.json"):  # what the deployments mount, nothing more
        shutil.copy(keydir / name, secrets / name)
    env = image_env(image, secrets, state)
    python = image["prefix"] / "bin" / "python"
    where = subprocess.run([python, "-c", "import secure_ws; print(secure_ws.__file__)"], env=env, cwd=state, capture_output=True, text=True)
    assert where.stdout.startswith(str(image["prefix"])), f"not the installed package: {where.stdout}{where.stderr}"

    port = free_port()
    # The image's own command; only the port (8443 may be taken here) and the address (loopback in a test) differ.
    def local(argv: list[str]) -> list[str]:
        return [a.replace("8443", str(port)).replace("0.0.0.0", "127.0.0.1") for a in argv]

    entrypoint = exec_form(instructions(runtime, "ENTRYPOINT")[0])
    command = local(entrypoint + exec_form(instructions(runtime, "CMD")[0]))
    command[0] = str(image["prefix"] / "bin" / command[0])
    health = local(healthcheck_command(runtime))

    def healthy() -> bool:
        return subprocess.run(health, env=env, cwd=state, capture_output=True, timeout=30).returncode == 0

    assert not healthy(), "the health check passes with no server running"
    log = open(tmp_path / "image.log", "wb")
    server = subprocess.Popen(command, env=env, cwd=state, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(healthy, 30, f"the HEALTHCHECK command to pass:\n{(tmp_path / 'image.log').read_text()}")
        client = Server(keydir, env)
        client.port = port

        async def connect():
            async with client.connect(issue()) as ws:
                return await welcome(ws)

        assert run(connect())["type"] == "welcome"
        assert json.loads(client.get("/healthz")[2]) == {"status": "ok"}
    finally:
        server.send_signal(signal.SIGTERM)
        # uvicorn ends by re-raising the SIGTERM it handled: a clean stop for Docker and systemd alike.
        assert server.wait(30) in (0, -signal.SIGTERM), (tmp_path / "image.log").read_text()
        log.close()
    assert not healthy(), "the health check passes after the server stopped"
    records = [json.loads(line) for line in (tmp_path / "image.log").read_text().splitlines() if line.startswith("{")]
    assert any(r.get("logger", "").startswith("secure_ws") for r in records), "SECURE_WS_LOG_FORMAT=json (the image's ENV) not applied"


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert "redis" in services
    replicas = [s for name, s in services.items() if name.startswith("secure-ws")]
    assert len(replicas) >= 2
    runtime_env = env_of(dockerfile()[-1])
    mounted_paths = {runtime_env["SECURE_WS_TLS_CERTFILE"], runtime_env["SECURE_WS_TLS_KEYFILE"], runtime_env["SECURE_WS_JWKS_FILE"]}
    for service in replicas:
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["environment"]["SECURE_WS_STORAGE_URL"].startswith("redis://redis:")
        assert set(service["environment"]) <= known_variables()
        assert {s["target"] for s in service["secrets"]} == mounted_paths, "secrets must land where the image's ENV looks"
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        assert service["cap_drop"] == ["ALL"]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    published = [p for service in replicas for p in service["ports"]]
    assert len(set(published)) == len(published)
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("../certs/"), "secrets come from files on the host, never inline"


# -- systemd ----------------------------------------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in (DEPLOY / "secure-ws.service").read_text().splitlines():
        if line.strip() and not line.startswith(("#", "[")):
            name, _, value = line.partition("=")
            directives.setdefault(name.strip(), []).append(value.strip())
    return directives


def test_systemd_unit_hardening():
    u = unit()
    assert u.get("DynamicUser") == ["yes"] or u.get("User", [""])[0] not in ("", "root")
    for name, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("ProtectHome", "yes"),
                        ("RestartPreventExitStatus", "2"), ("CapabilityBoundingSet", "")):
        assert u.get(name) == [value], f"{name}={u.get(name)}"
    assert any(path.lstrip("-").endswith("/certs") for path in u["ReadWritePaths"])
    assert u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    exec_start = shlex.split(u["ExecStart"][0])
    assert exec_start[0] == f"{IMAGE_PREFIX}/bin/secure-ws" and exec_start[1] == "serve"
    args = serve_args(exec_start[2:])
    assert args.workers > 1 and any(v.startswith("SECURE_WS_STORAGE_URL=redis://") for v in " ".join(u["Environment"]).split())
    assert int(u["TimeoutStopSec"][0]) > GRACEFUL_SHUTDOWN_SECONDS
    assert {v.split("=")[0] for e in u["Environment"] for v in e.split() if v.startswith("SECURE_WS_")} <= known_variables()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify(image, tmp_path):
    """The unit as shipped, with only the venv's path pointing at this test's fresh install of it."""
    text = (DEPLOY / "secure-ws.service").read_text().replace(IMAGE_PREFIX, str(image["prefix"]))
    path = tmp_path / "secure-ws.service"
    path.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on some problems (an unknown or unparsable directive is only a warning): no output at all.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


# -- Kubernetes -------------------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in found, f"two {document['kind']}s"
                found[document["kind"]] = document
    return found


def test_kubernetes_manifests():
    k8s = manifests()
    assert set(k8s) == {"Deployment", "Service", "PodDisruptionBudget", "Secret"}
    deployment = k8s["Deployment"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    assert k8s["Service"]["spec"]["selector"].items() <= labels.items()
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["replicas"] >= 2
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = serve_args(container["args"])
    assert ports[k8s["Service"]["spec"]["ports"][0]["targetPort"]] == args.port

    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        http = container[probe]["httpGet"]
        assert (http["path"], http["scheme"], ports[http["port"]]) == (path, "HTTPS", args.port), probe
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) >= 5, "preStop must give balancers time to stop routing here"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + GRACEFUL_SHUTDOWN_SECONDS

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    secret = k8s["Secret"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    secret_volume = next(v for v in volumes.values() if "secret" in v)
    assert secret_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert {item["key"] for item in secret_volume["secret"]["items"]} <= set(secret["stringData"])
    assert mounts[SECRETS]["readOnly"] is True and mounts[SECRETS]["name"] == secret_volume["name"]
    assert "/tmp" in mounts, "a writable /tmp for the workers' metrics files on a read-only root"
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= known_variables()
    assert env["SECURE_WS_STORAGE_URL"]["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    for name, entry in env.items():
        if name.endswith("FILE"):
            assert any(entry["value"].startswith(path + "/") for path in mounts), f"{name} is on no mounted volume"
    assert "signing-keys.json" not in secret["stringData"]


# -- Prometheus and Grafana -------------------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")


def exported_names() -> set[str]:
    """Every sample name /metrics can show (the process metrics included), from the metrics module itself."""
    from prometheus_client.parser import text_string_to_metric_families

    from secure_ws import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    names = set()
    for family in text_string_to_metric_families(metrics.exposition()[0].decode()):  # labelled families too, before any sample
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def queried_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:secure_ws|process)_[a-z_]+)\b", expr))


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    return exprs


def test_dashboard_queries_name_real_metrics():
    known = exported_names()
    seen: set[str] = set()
    for expr in dashboard_queries():
        names = queried_names(expr)
        assert names, expr
        assert names <= known, f"{expr}: no such metric {names - known}"
        seen |= names
    for family in ("secure_ws_connections_active", "secure_ws_handshakes_total", "secure_ws_closes_total", "secure_ws_storage_seconds_bucket",
                   "secure_ws_revocations_checked_timestamp_seconds", "secure_ws_keyring_reloads_total", "process_cpu_seconds_total"):
        assert family in seen, f"the dashboard shows nothing of {family}"


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    """promtool parses each dashboard query, as a recording rule (Grafana's variables given plain values)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".*")}
             for i, expr in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_check_and_unit_tests():
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert {"SecureWSStorageUnavailable", "SecureWSHandshakeFailureRatio", "SecureWSSlowConsumers", "SecureWSRevocationLag"} <= names
    known = exported_names()
    for group in alerts["groups"]:
        for rule in group["rules"]:
            assert queried_names(rule["expr"]) <= known, rule["alert"]
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    unit_tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    exercised = {case["alertname"] for test in unit_tests["tests"] for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert exercised == names, f"alerts never seen firing in alerts_test.yml: {names - exercised}"


def prometheus_api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (Debian: prometheus)")
def test_real_prometheus_scrapes_a_multi_worker_server(keydir, issue, own_redis, tmp_path):
    """A real Prometheus, with the shipped alert rules, scraping `secure-ws serve --workers 2` over TLS (the dev
    CA): one scrape target carries both workers' process metrics and the summed counts; with Redis gone, the
    storage alert goes pending."""
    redis = own_redis()
    server = Serve(keydir, base_env(keydir, SECURE_WS_STORAGE_URL=redis.url), ("--workers", "2")).start()
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [{
            "job_name": "secure-ws",
            "scheme": "https",
            "tls_config": {"ca_file": str(keydir / "ca.crt"), "server_name": "localhost"},
            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
        }],
    }))
    log = open(tmp_path / "prometheus.log", "wb")
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        async def traffic():
            for _ in range(3):
                async with server.connect(issue()) as ws:
                    await welcome(ws)

        run(traffic())
        wait_for(lambda: scrape(server)[("secure_ws_handshakes_total", (("result", "accepted"),))] == 3, 15, "the server's own count")

        def query(expr: str) -> list[dict[str, Any]] | None:
            try:
                return prometheus_api(web, "query", query=expr)["result"] or None
            except OSError:  # not listening yet
                return None

        accepted = wait_for(lambda: query('secure_ws_handshakes_total{job="secure-ws",result="accepted"} == 3'), 60,
                            f"Prometheus to scrape the three handshakes:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}")
        assert accepted[0]["metric"]["instance"] == f"127.0.0.1:{server.port}"
        workers = wait_for(lambda: query('count(process_cpu_seconds_total{job="secure-ws"}) == 2'), 30, "both workers' process metrics")
        assert workers
        rules = prometheus_api(web, "rules")["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"SecureWSStorageUnavailable", "SecureWSRevocationLag"}
        assert all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"]), rules

        redis.kill()

        def storage_alert() -> bool:
            alerts = prometheus_api(web, "alerts")["alerts"]
            return any(a["labels"]["alertname"] == "SecureWSStorageUnavailable" and a["state"] in ("pending", "firing") for a in alerts)

        wait_for(storage_alert, 40, "SecureWSStorageUnavailable to go pending once Redis is gone")
    finally:
        prometheus.terminate()
        prometheus.wait(20)
        log.close()
        server.stop()
