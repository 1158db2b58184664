"""deploy/kubernetes/inference-extension (the gateways as an Inference Extension InferencePool, with an endpoint
picker) against what it deploys, since no cluster runs here: the custom resources against the published CRD schemas
(tests/data/crds), which Kubernetes would check, and the unknown fields, which Kubernetes would silently drop; the
references between the objects; and the picker's metric mapping against the metrics the gateway exports."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.pool import ModelLoad
from gateway.engine.state import EngineState
from gateway.metrics import Metrics, model_server_metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAY = K8S / "inference-extension"
CRDS = ROOT / "tests" / "data" / "crds"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects() -> list[dict[str, Any]]:
    return [
        doc for path in sorted(OVERLAY.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in documents(path)
    ]


def find(kind: str, name: str, where: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    matches = [
        o for o in (objects() if where is None else where) if o["kind"] == kind and o["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def base_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml" for doc in documents(path)]


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = documents(path)[0]
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields a structural schema does not declare: Kubernetes prunes them without a word (a v1alpha2 field in a v1
    object, a typo), so the manifest would not mean what it says."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{where}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{where}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return found


def violations(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    errors = [
        f"{error.instance_path}: {error.message}" for error in jsonschema_rs.Draft4Validator(schema).iter_errors(obj)
    ]
    return errors + [f"{field}: not in the schema" for field in unknown_fields(obj, schema)]


def test_the_custom_resources_are_valid_for_the_published_crds() -> None:
    schemas = crd_schemas()
    custom = [o for o in objects() if (o["apiVersion"], o["kind"]) in schemas]
    assert [o["kind"] for o in custom] == ["InferencePool"]
    for obj in custom:
        assert violations(obj, schemas[(obj["apiVersion"], obj["kind"])]) == [], obj["metadata"]["name"]
    # And the check sees what a cluster would refuse or drop: v1alpha2's field names in a v1 pool.
    old = copy.deepcopy(custom[0])
    old["spec"]["targetPortNumber"] = old["spec"].pop("targetPorts")[0]["number"]
    found = violations(old, schemas[("inference.networking.k8s.io/v1", "InferencePool")])
    assert any("targetPorts" in line for line in found) and ".spec.targetPortNumber: not in the schema" in found


def test_the_pool_selects_every_gateway_pod_on_its_port_and_names_its_picker() -> None:
    pool = find("InferencePool", "mistral-gateway")
    gateway = find("Deployment", "mistral-gateway", base_objects())
    pods = gateway["spec"]["template"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()
    (http,) = [p for c in pods["spec"]["containers"] for p in c["ports"] if p["name"] == "http"]
    settings = find("ConfigMap", "mistral-gateway-settings", base_objects())["data"]
    assert (
        [p["number"] for p in pool["spec"]["targetPorts"]] == [http["containerPort"]] == [int(settings["GATEWAY_PORT"])]
    )
    assert pods["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"  # only ready pods count

    picker = pool["spec"]["endpointPickerRef"]
    service = find("Service", picker["name"])
    (grpc,) = [p for p in service["spec"]["ports"] if p["port"] == picker["port"]["number"]]
    epp = find("Deployment", picker["name"])
    assert service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert grpc["targetPort"] in [p["name"] for c in epp["spec"]["template"]["spec"]["containers"] for p in c["ports"]]
    route = find("HTTPRoute", "mistral-gateway")
    assert [(b["kind"], b["name"]) for r in route["spec"]["rules"] for b in r["backendRefs"]] == [
        ("InferencePool", pool["metadata"]["name"])
    ]


def picker_config() -> tuple[dict[str, Any], dict[str, Any]]:
    """The picker's configuration, and its container."""
    epp = find("Deployment", "mistral-gateway-epp")
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    key = Path(args["config-file"]).relative_to(mount["mountPath"]).as_posix()
    text = find("ConfigMap", volume["configMap"]["name"])["data"][key]
    assert args["pool-name"] == find("InferencePool", "mistral-gateway")["metadata"]["name"]
    role = find("Role", epp["spec"]["template"]["spec"]["serviceAccountName"])
    assert any("pods" in rule["resources"] and "watch" in rule["verbs"] for rule in role["rules"])
    return yaml.safe_load(text), container


def test_the_pickers_plugins_are_declared_and_the_pods_carry_its_engine_label() -> None:
    config, _ = picker_config()
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    declared = {plugin.get("name", plugin["type"]) for plugin in config["plugins"]}
    referenced = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    for source in config["dataLayer"]["sources"]:
        referenced |= {source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])}
    assert referenced <= declared and "lora-affinity-scorer" in referenced
    (extractor,) = [p["parameters"] for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    assert set(engine) == {
        "name",
        "queuedRequestsSpec",
        "runningRequestsSpec",
        "kvUsageSpec",
        "loraSpec",
        "cacheInfoSpec",
    }
    labels = find("Deployment", "mistral-gateway", base_objects())["spec"]["template"]["metadata"]["labels"]
    assert labels[extractor["engineLabelKey"]] == labels["llm-d.ai/engine-type"] == engine["name"]


SPEC = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?$")


def test_every_metric_the_picker_reads_is_one_the_gateway_exports_one_series_a_server() -> None:
    config, _ = picker_config()
    (extractor,) = [p["parameters"] for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (source,) = [p["parameters"] for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["path"] == "/metrics"
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"]]
    loads = [
        ModelLoad("alpha", "alpha", EngineState.READY, 2, 0),
        ModelLoad("beta", "beta", EngineState.STARTING, 0, 3),
    ]
    metrics = Metrics()

    def protocol() -> list[Metric]:
        return model_server_metrics(loads, {"alpha": 0.5}, capacity=2, now=1.7e9)

    metrics.watch(protocol, protocol=True)
    exported = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    read = {}
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        match = SPEC.match(engine[field])
        assert match, engine[field]
        family = exported[match["name"]]
        wanted = dict(re.findall(r'(\w+)="?([^",]*)"?', match["labels"] or ""))
        series = [s for s in family.samples if wanted.items() <= s.labels.items()]
        assert len(series) == 1, f"{engine[field]}: the picker needs one series a server, the gateway has {series}"
        read[field] = series[0]
    assert read["queuedRequestsSpec"].value == 3 and read["runningRequestsSpec"].value == 2
    assert read["kvUsageSpec"].value == 0.5
    assert read["loraSpec"].labels["running_lora_adapters"] == "alpha"


def test_the_overlay_lists_every_file_and_builds_on_the_gateways_deployment() -> None:
    kustomization = documents(OVERLAY / "kustomization.yaml")[0]
    files = {p.name for p in OVERLAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == {"../", *files}
