"""The files under deploy/ against the code they deploy: names, paths, ports, routes and settings must agree."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.catalog import parse_catalog
from gateway.errors import BodyTooLarge
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
UNIT = DEPLOY / "systemd" / "mistral-gateway.service"
NGINX_SITE = DEPLOY / "nginx" / "mistral-gateway.conf"

# Named in deploy files but added to Settings by other issues (cache, API keys, log format); once they
# are real settings this list is redundant, never wrong.
PENDING_SETTINGS = {"GATEWAY_CACHE_URL", "GATEWAY_API_KEYS", "GATEWAY_ADMIN_KEY", "GATEWAY_LOG_FORMAT"}

DEFAULTS = Settings(_env_file=None)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def routes() -> set[str]:
    """Paths of the gateway's routes, as written in its route tables."""
    source = "\n".join(path.read_text() for path in (ROOT / "gateway").rglob("*.py") if "bundled" not in path.parts)
    return set(re.findall(r'Route\(\s*"(/[^"]*)"', source))


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in deploy/kubernetes, found {len(matches)}"
    return matches[0]


def gateway_container() -> dict[str, Any]:
    containers = find("Deployment", "mistral-gateway")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def settings_configmap() -> dict[str, str]:
    data: dict[str, str] = find("ConfigMap", "mistral-gateway-settings")["data"]
    return data


# ------------------------------------------------------------------------------------------ every file


def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "docker/compose.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/kustomization.yaml",
        "kubernetes/pvc.yaml",
        "kubernetes/redis.yaml",
        "kubernetes/service.yaml",
    }
    for path in files:
        docs = documents(path)
        assert docs, f"{path} holds no document"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document must be a mapping"


def test_every_gateway_variable_in_deploy_files_is_a_setting() -> None:
    known = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields} | PENDING_SETTINGS
    used: dict[str, set[str]] = {}
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for name in re.findall(r"\bGATEWAY_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")):
            used.setdefault(name, set()).add(path.relative_to(DEPLOY).as_posix())
    unknown = {name: sorted(files) for name, files in used.items() if name not in known}
    assert not unknown, f"not gateway settings: {unknown}"
    assert "GATEWAY_MODEL_DIR" in used  # the scan does find them


# ------------------------------------------------------------------------------------------ Kubernetes


def test_kubernetes_objects_are_well_formed_and_all_listed_in_the_kustomization() -> None:
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind"), obj
        assert obj.get("metadata", {}).get("name"), f"{obj['kind']} without metadata.name"
    kustomization = documents(K8S / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_services_select_their_deployments_and_reach_a_container_port() -> None:
    for service in (o for o in k8s_objects() if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            d
            for d in k8s_objects()
            if d["kind"] == "Deployment" and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} deployments"
        deployment = targets[0]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        ports = [p for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (
                f"Service {service['metadata']['name']}: targetPort {target!r} is no container port"
            )


def test_gateway_deployment_ports_probes_and_cache() -> None:
    deployment = find("Deployment", "mistral-gateway")
    assert deployment["spec"]["replicas"] == 2
    container = gateway_container()
    settings = settings_configmap()
    (http,) = [p for p in container["ports"] if p.get("name") == "http"]
    assert http["containerPort"] == int(settings["GATEWAY_PORT"])
    assert settings["GATEWAY_HOST"] == "0.0.0.0"  # reachable from the kubelet and the Service

    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", http["containerPort"])
    assert {"/healthz", "/readyz"} <= routes()

    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["mistral-gateway-settings"]
    env = {e["name"]: e["value"] for e in container["env"]}
    cache = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", env["GATEWAY_CACHE_URL"])
    assert cache, env["GATEWAY_CACHE_URL"]
    redis = find("Service", cache.group(1))
    assert int(cache.group(2)) in [p["port"] for p in redis["spec"]["ports"]]


def test_models_file_and_models_volume_are_mounted_where_the_settings_say() -> None:
    settings = settings_configmap()
    container = gateway_container()
    volumes = {v["name"]: v for v in find("Deployment", "mistral-gateway")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    models_file = Path(settings["GATEWAY_MODELS_FILE"])
    mount = mounts[str(models_file.parent)]
    source = volumes[mount["name"]]["configMap"]
    (item,) = [i for i in source["items"] if i["path"] == models_file.name]
    text = find("ConfigMap", source["name"])["data"][item["key"]]
    catalog = parse_catalog(text, origin="configmap models.toml", model_dir=Path(settings["GATEWAY_MODEL_DIR"]))
    assert catalog.default_model and catalog.default_embedding_model

    model_dir = mounts[settings["GATEWAY_MODEL_DIR"]]
    claim = volumes[model_dir["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = find("PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # the replicas share one cache
    assert settings["HF_HOME"].startswith(settings["GATEWAY_MODEL_DIR"] + "/")
    assert settings["GATEWAY_RUN_DIR"].startswith("/tmp/") and "/tmp" in mounts


def test_termination_grace_outlasts_the_gateway_shutdown() -> None:
    settings = settings_configmap()
    spec = find("Deployment", "mistral-gateway")["spec"]["template"]["spec"]
    pre_stop = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = int(pre_stop[1]) + float(settings["GATEWAY_SHUTDOWN_TIMEOUT"]) + float(settings["GATEWAY_STOP_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > needed


# ------------------------------------------------------------------------------------------ Docker


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def test_dockerfile_builds_what_the_package_provides() -> None:
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    installs = [args for instruction, args in steps if instruction == "RUN" and "pip install" in args]
    # The dependencies (the engine extra's too) from the hash-pinned lock, then the package alone: nothing unpinned.
    assert installs == [
        "pip install --require-hashes -r requirements.lock",
        "pip install --no-deps --no-build-isolation .",
    ]
    assert "engine" in pyproject()["project"]["optional-dependencies"]  # what the lock covers (tests/unit/test_lock.py)
    copied = [args.split()[:-1] for instruction, args in steps if instruction == "COPY"]
    assert copied[0] == ["requirements.lock"]  # first: a change to the code does not redo the dependencies' layer
    assert (ROOT / "gateway" / "__init__.py").is_file()

    cmd = json.loads(next(args for instruction, args in steps if instruction == "CMD"))
    scripts = pyproject()["project"]["scripts"]
    assert cmd[0] in scripts and scripts[cmd[0]] == "gateway.cli:main"
    assert cmd[1:] in ([], ["serve"])

    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_dockerfile_ports_volume_and_healthcheck_agree() -> None:
    steps = dict(dockerfile())  # the last of each instruction
    env = docker_env()
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert steps["EXPOSE"] == env["GATEWAY_PORT"] == str(DEFAULTS.port)
    assert json.loads(steps["VOLUME"]) == [env["GATEWAY_MODEL_DIR"]] == ["/models"]
    assert env["HF_HOME"].startswith("/models/")
    healthcheck = steps["HEALTHCHECK"]
    assert "CMD" in healthcheck and "curl" not in healthcheck and '"python"' in healthcheck
    paths = re.findall(r"http://127\.0\.0\.1:[^/]*(/[a-z]+)", healthcheck)
    assert paths == ["/healthz"] and paths[0] in routes()


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore
    copied = {s for i, a in dockerfile() if i == "COPY" for s in a.split()[:-1]}
    assert copied <= kept


def test_compose_builds_the_dockerfile_with_redis_and_a_models_volume() -> None:
    compose_file = DEPLOY / "docker" / "compose.yaml"
    compose = documents(compose_file)[0]
    gateway = compose["services"]["gateway"]
    context = (compose_file.parent / gateway["build"]["context"]).resolve()
    assert context == ROOT and (context / gateway["build"]["dockerfile"]) == DOCKERFILE
    host = re.fullmatch(r"redis://([a-z0-9-]+):6379/\d+", gateway["environment"]["GATEWAY_CACHE_URL"])
    assert host and host.group(1) in compose["services"]
    assert "redis" in gateway["depends_on"]
    volume, path = gateway["volumes"][0].split(":")[:2]
    assert volume in compose["volumes"] and path == docker_env()["GATEWAY_MODEL_DIR"]
    assert any(p.endswith(":8080") for p in gateway["ports"])
    env = gateway["environment"]
    grace = int(gateway["stop_grace_period"].removesuffix("s"))
    assert grace > float(env["GATEWAY_SHUTDOWN_TIMEOUT"]) + float(env["GATEWAY_STOP_TIMEOUT"])


# ------------------------------------------------------------------------------------------ systemd


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def unit_values(key: str) -> list[str]:
    """Every value of a key that systemd allows to repeat (configparser keeps only the last)."""
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(key + "=")]


def test_systemd_unit_runs_the_console_script_as_its_own_user() -> None:
    service = unit()["Service"]
    exec_start = shlex.split(service["ExecStart"])
    assert Path(exec_start[0]).name == "mistral-gateway" in pyproject()["project"]["scripts"]
    assert exec_start[0] == "/opt/mistral-gateway/.venv/bin/mistral-gateway"
    assert service["User"] == "mistral-gateway"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/mistral-gateway/gateway.env"
    assert service["Restart"] == "on-failure"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_stops_gracefully_and_takes_the_engine_down() -> None:
    service = unit()["Service"]
    env_file = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / "gateway.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    shutdown = float(env_file.get("GATEWAY_SHUTDOWN_TIMEOUT", DEFAULTS.shutdown_timeout))
    stop = float(env_file.get("GATEWAY_STOP_TIMEOUT", DEFAULTS.stop_timeout))
    assert int(service["TimeoutStopSec"]) > shutdown + stop
    assert int(service["TimeoutStopSec"]) > DEFAULTS.shutdown_timeout + DEFAULTS.stop_timeout
    # mixed: SIGTERM to the gateway alone (it drains, then stops the engine), SIGKILL to whatever is left.
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"


def test_systemd_hardening_leaves_the_engine_able_to_run() -> None:
    service = unit()["Service"]
    for forbidden in ("MemoryDenyWriteExecute", "SystemCallFilter", "PrivateDevices", "ProtectClock"):
        assert forbidden not in service, f"{forbidden} would stop the engine from running"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes" and service["PrivateTmp"] == "yes"
    env = dict(value.split("=", 1) for value in unit_values("Environment"))
    writable = service["ReadWritePaths"].split()
    state = f"/var/lib/{service['StateDirectory']}"
    runtime = f"/run/{service['RuntimeDirectory']}"
    assert service["StateDirectory"] == "mistral-gateway"
    for name in ("GATEWAY_MODEL_DIR", "GATEWAY_RUN_DIR", "HF_HOME"):
        assert any(env[name] == w or env[name].startswith(w + "/") for w in writable), name
        assert env[name].startswith((state, runtime)), name
    assert service["WorkingDirectory"] == state


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_no_unknown_or_invalid_setting(tmp_path: Path) -> None:
    # verify also wants ExecStart to exist: point it at a program that does.
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text()))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert complaints == []


# ------------------------------------------------------------------------------------------ nginx


def nginx_directives() -> str:
    return "\n".join(line.split("#", 1)[0] for line in NGINX_SITE.read_text().splitlines())


def test_nginx_site_streams_unbuffered_with_long_timeouts() -> None:
    conf = nginx_directives()
    for needed in (
        "proxy_buffering off;",
        "proxy_cache off;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
    ):
        assert needed in conf, needed
    upstream = re.search(r"upstream\s+(\w+)\s*\{([^}]*)\}", conf)
    assert upstream and re.search(r"\bkeepalive\s+\d+;", upstream.group(2))
    assert f"server 127.0.0.1:{DEFAULTS.port};" in upstream.group(2)
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        value = re.search(rf"{timeout}\s+(\d+)s;", conf)
        assert value and int(value.group(1)) > max(DEFAULTS.startup_timeout, DEFAULTS.request_timeout), timeout
    gzip_types = re.findall(r"gzip_types([^;]*);", conf)
    assert gzip_types and all("text/event-stream" not in types for types in gzip_types)
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID"):
        assert f"proxy_set_header {header} " in conf, header


def test_nginx_body_limit_is_the_gateways_and_answers_in_its_error_shape() -> None:
    conf = nginx_directives()
    limit = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert limit and float(limit.group(1)) == DEFAULTS.max_body_mb
    body = re.search(r"return 413 '(.*)';", conf)
    assert body
    error = json.loads(body.group(1).replace("\\n", ""))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (BodyTooLarge.type, BodyTooLarge.code)
