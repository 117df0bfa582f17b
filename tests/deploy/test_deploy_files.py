"""The files in deploy/: valid against their schemas, and consistent with the node they run.

No Docker engine or Kubernetes cluster runs here, so the Compose file is checked against
the Compose Specification's JSON schema and the manifests against the Kubernetes API
schemas (both shipped inside Python packages, no network), and what can be run is run:
the StatefulSet's start script with ``--check-config`` for every pod, and the systemd
unit's ExecStart line as three real nodes (see test_systemd_unit.py).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
KUBERNETES_FILE = DEPLOY / "kubernetes" / "raftchan.yaml"

#: The oldest Kubernetes release whose API the manifests must fit (policy/v1 PDBs and
#: everything else used here are older than that).
KUBERNETES_VERSION = "1.28.0"

RAFTCHAN_SERVICES = ("raftchan-1", "raftchan-2", "raftchan-3")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def kubernetes_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERNETES_FILE.read_text()) if doc]


def kubernetes_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in kubernetes_documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {KUBERNETES_FILE.name}"
    return found[0]


def flag_values(command: list[str]) -> dict[str, str]:
    """``--flag=value`` items of a Compose command as {flag: value}."""
    return dict(item.split("=", 1) for item in command if item.startswith("--") and "=" in item)


# ------------------------------------------------------------------------------ Compose


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(compose(), schema, cls=jsonschema.Draft7Validator)


def test_compose_schema_check_can_fail() -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    broken = compose()
    broken["services"]["raftchan-1"]["healthcheck"]["interval"] = ["not", "a", "duration"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_compose_nodes_list_each_other_as_peers_and_share_the_secret() -> None:
    services = compose()["services"]
    raft_addresses = {}
    for name in RAFTCHAN_SERVICES:
        flags = flag_values(services[name]["command"])
        assert flags["--name"] == name
        raft_addresses[name] = flags["--peer-address"]
        assert flags["--client-address"].startswith(f"{name}:")
        assert services[name]["secrets"] == ["cluster-secret"]
        env = services[name]["environment"]
        assert env["RAFTCHAN_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster-secret"
    for name in RAFTCHAN_SERVICES:
        peers = flag_values(services[name]["command"])["--peers"].split(",")
        others = [address for other, address in raft_addresses.items() if other != name]
        assert sorted(peers) == sorted(others), f"{name} must list exactly the other nodes"


def test_compose_health_check_asks_the_nodes_health_endpoint() -> None:
    for name in RAFTCHAN_SERVICES:
        service = compose()["services"][name]
        port = flag_values(service["command"])["--http-address"].rsplit(":", 1)[1]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/health" in probe


def test_compose_dask_worker_finds_every_node() -> None:
    services = compose()["services"]
    clients = {
        flag_values(services[name]["command"])["--client-address"] for name in RAFTCHAN_SERVICES
    }
    worker_env = services["dask-worker"]["environment"]
    assert set(worker_env["RAFTCHAN_ADDRESS"].split(",")) == clients


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_are_valid_against_the_api_schemas() -> None:
    docs = kubernetes_documents()
    assert {doc["kind"] for doc in docs} == {
        "Secret",
        "Service",
        "PodDisruptionBudget",
        "StatefulSet",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_schema_check_can_fail() -> None:
    statefulset = kubernetes_object("StatefulSet")
    statefulset["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSION, strict=True)


def test_statefulset_uses_the_headless_service_and_the_pdb_allows_one_down() -> None:
    statefulset = kubernetes_object("StatefulSet")
    headless = kubernetes_object("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # Members resolve each other before any of them is ready (a leader needs a majority).
    assert headless["spec"]["publishNotReadyAddresses"] is True
    pdb = kubernetes_object("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for selector in (headless["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def node_container() -> dict[str, Any]:
    containers = kubernetes_object("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "node")


def test_probes_ask_the_nodes_own_http_endpoint() -> None:
    container = node_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["RAFTCHAN_HTTP_ADDRESS"].endswith(f":{ports['http']}")
    readiness = container["readinessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/health", "http")
    liveness = container["livenessProbe"]["httpGet"]
    assert (liveness["path"], liveness["port"]) == ("/metrics", "http")


def test_cluster_secret_is_mounted_where_the_node_reads_it() -> None:
    container = node_container()
    env = {item["name"]: item.get("value") for item in container["env"]}
    secret_file = Path(env["RAFTCHAN_CLUSTER_SECRET_FILE"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(mounts["cluster-secret"]) == secret_file.parent
    volumes = kubernetes_object("StatefulSet")["spec"]["template"]["spec"]["volumes"]
    secret_volume = next(v for v in volumes if v["name"] == "cluster-secret")
    secret = kubernetes_object("Secret", secret_volume["secret"]["secretName"])
    assert secret_file.name in secret["stringData"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ordinal", [0, 1, 2])
def test_statefulset_start_script_gives_each_pod_a_config_the_node_accepts(
    ordinal: int, tmp_path: Path
) -> None:
    """Runs the container's own command for pod ``raftchan-<ordinal>``, with
    ``--check-config`` appended, against the real ``raftchan`` command."""
    container = node_container()
    pod = f"raftchan-{ordinal}"
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    secret = tmp_path / "cluster-secret"
    secret.write_bytes(os.urandom(32))
    env |= {
        "POD_NAME": pod,
        # Paths of the pod's volumes, moved under the test's folder.
        "RAFTCHAN_DATA_DIR": str(tmp_path / "data"),
        "RAFTCHAN_CLUSTER_SECRET_FILE": str(secret),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [*container["command"], "--check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    settings = {
        line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if " (" in line
    }
    service = env["PEERS_SERVICE"]
    assert settings["name"] == pod
    assert settings["peer-address"] == f"{pod}.{service}:7200"
    expected_peers = [f"raftchan-{i}.{service}:7200" for i in range(3) if i != ordinal]
    assert settings["peers"].split(",") == expected_peers
    assert settings["cluster-secret-file"] == str(secret)
    assert not (tmp_path / "data").exists()


def test_start_script_is_posix_shell() -> None:
    # The image's /bin/sh may be dash: the script must parse there too.
    script = node_container()["command"][2]
    shells = [path for path in map(shutil.which, ("sh", "dash")) if path is not None]
    assert shells, "no POSIX shell to check the script with"
    for shell in shells:
        subprocess.run([shell, "-n", "-c", script], check=True, timeout=10)
