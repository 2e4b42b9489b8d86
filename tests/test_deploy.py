"""The deployment files in deploy/: Kubernetes manifests, the lock, the image's health check.

No containers here (tests/test_container.py runs the image): these read the files and hold
them to the promises deploy/README.md makes.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
# The Kubernetes release the manifests are checked against (the Makefile's K8S_VERSION).
K8S_VERSION = re.search(r"^K8S_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.M)


def manifests() -> list[dict[str, Any]]:
    """Every object in deploy/k8s/ (kustomization.yaml is kustomize's, not the API's)."""
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def container(deployment: str) -> dict[str, Any]:
    [only] = one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", REPO / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "manifest", manifests(), ids=lambda m: f"{m['kind']}/{m['metadata']['name']}"
)
def test_each_manifest_passes_the_kubernetes_schema_strictly(manifest: dict[str, Any]) -> None:
    """Every object validates, unknown fields refused, against the Makefile's release."""
    assert K8S_VERSION is not None
    kubernetes_validate.validate(manifest, K8S_VERSION.group(1), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k deploy/k8s` applies every file there."""
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def test_pods_get_longer_than_the_shutdown_time_to_stop() -> None:
    """terminationGracePeriodSeconds exceeds COINVOICE_SHUTDOWN_SECONDS plus any preStop sleep."""
    shutdown = int(one("ConfigMap", "coinvoice")["data"]["COINVOICE_SHUTDOWN_SECONDS"])
    for name in ("coinvoice-receiver", "coinvoice-worker"):
        grace = one("Deployment", name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = container(name).get("lifecycle", {}).get("preStop", {}).get("exec", {})
        sleep = int(pre_stop["command"][1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
        assert grace > shutdown + sleep, name


def test_probes_ask_the_health_endpoints_and_the_worker_check() -> None:
    """Receivers: ready on /health/ready, live on /health/live; workers: their own
    heartbeat, `worker --check --this-host`."""
    receiver = container("coinvoice-receiver")
    assert receiver["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert receiver["livenessProbe"]["httpGet"]["path"] == "/health/live"
    worker = container("coinvoice-worker")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["coinvoice", "worker", "--check", "--this-host"]


def test_pods_run_as_the_images_non_root_user_read_only_with_limits() -> None:
    """Both Deployments: uid 10001, read-only root, no privilege escalation, requests and limits."""
    for name in ("coinvoice-receiver", "coinvoice-worker"):
        pod = one("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        security = container(name)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        resources = container(name)["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()


def test_receivers_are_covered_by_a_disruption_budget_and_an_autoscaler() -> None:
    """A PDB keeps a receiver (and a worker) up through node drains; an HPA scales receivers."""
    hpa = one("HorizontalPodAutoscaler", "coinvoice-receiver")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "coinvoice-receiver"
    assert hpa["spec"]["minReplicas"] >= 2
    assert one("PodDisruptionBudget", "coinvoice-receiver")["spec"]["minAvailable"] >= 1
    assert one("PodDisruptionBudget", "coinvoice-worker")["spec"]["maxUnavailable"] == 1


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    """deploy/requirements.lock names each pyproject dependency with ==, each with a hash
    (`make lock` was run after the last change to the dependencies)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {
        re.split(r"[\[<>=!~ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]
    }
    lock = (REPO / "deploy" / "requirements.lock").read_text()
    pinned = re.findall(r"^([a-z0-9_.-]+)==\S+ \\\n\s+--hash=sha256:", lock, re.M | re.I)
    missing = wanted - {name.lower().replace("_", "-") for name in pinned}
    assert not missing, f"deploy/requirements.lock lacks {sorted(missing)}: run `make lock`"
    assert len(pinned) == len(re.findall(r"^[a-z0-9_.-]+==", lock, re.M | re.I))


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (b"/opt/coinvoice/bin/python3\0/opt/coinvoice/bin/coinvoice\0receiver\0", "receiver"),
        (b"/opt/coinvoice/bin/python3\0/opt/coinvoice/bin/coinvoice\0worker\0", "worker"),
        (b"coinvoice\0merchant\0add\0--name\0worker\0", "other"),
        (b"/bin/sh\0-c\0receiver\0", "other"),
    ],
)
def test_the_image_health_check_tells_the_role_from_pid_1(cmdline: bytes, role: str) -> None:
    """deploy/healthcheck.py checks what PID 1 runs: the subcommand right after `coinvoice`."""
    assert healthcheck().role(cmdline) == role


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8099/health/live"),  # noqa: S104 - the value under test
        ("10.1.2.3", "http://10.1.2.3:8099/health/live"),
        ("::1", "http://[::1]:8099/health/live"),
    ],
)
def test_the_image_health_check_asks_the_receivers_own_port(
    host: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wildcard bind is checked on loopback; the port is COINVOICE_PORT."""
    monkeypatch.setenv("COINVOICE_HOST", host)
    monkeypatch.setenv("COINVOICE_PORT", "8099")
    assert healthcheck().receiver_url() == url
