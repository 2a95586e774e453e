"""Deployment files are checked by the tools that will read them."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from stackfleet.nats_server import find_nats_server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.30"


def test_systemd_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package provides it)")
    units = []
    for unit in (DEPLOY / "systemd").glob("*.service"):
        # The install path does not exist on a test machine: point ExecStart at a binary that does.
        text = unit.read_text().replace("/opt/stackfleet/.venv/bin/stackfleet", "/bin/true")
        copy = tmp_path / unit.name
        copy.write_text(text)
        units.append(str(copy))
    assert len(units) == 2
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_nats_config_is_valid_for_nats_server() -> None:
    env = {**os.environ, "WEB_01_PASSWORD": "a", "WEB_02_PASSWORD": "c", "AGGREGATOR_PASSWORD": "b"}
    result = subprocess.run([find_nats_server(), "-t", "-c", str(DEPLOY / "nats" / "nats-server.conf")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def _manifests() -> list[dict[str, Any]]:
    return [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def test_kubernetes_manifests_validate_against_the_api_schema() -> None:
    # kubernetes-validate carries the OpenAPI schemas of each Kubernetes release: strict mode
    # also rejects fields the API does not know (typos that kubectl would silently drop).
    import kubernetes_validate

    docs = _manifests()
    assert {d["kind"] for d in docs} >= {"Namespace", "DaemonSet", "Deployment", "StatefulSet", "Service",
                                         "ConfigMap", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "DaemonSet"))
    broken["spec"]["template"]["spec"]["hostPid"] = True  # wrong case: must be rejected
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_nats_statefulset_is_a_three_node_jetstream_cluster() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    sts = docs[("StatefulSet", "nats")]
    assert sts["spec"]["replicas"] == 3
    conf = docs[("ConfigMap", "nats-config")]["data"]["nats.conf"]
    assert "jetstream" in conf and conf.count("nats-cluster.stackfleet.svc:6222") == 3


def test_containerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    files = sorted((DEPLOY / "container").glob("*.Containerfile"))
    assert len(files) == 2
    result = subprocess.run([hadolint, "--no-color", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_have_what_the_agent_needs() -> None:
    docs = {d["kind"]: d for d in _manifests()}
    assert {"Namespace", "DaemonSet", "Deployment"} <= set(docs)
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    agent = pod["containers"][0]
    caps = set(agent["securityContext"]["capabilities"]["add"])
    assert {"BPF", "PERFMON", "SYS_PTRACE"} <= caps and agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/sys/kernel", "/lib/modules", "/usr/src"} <= mounts
    env = {e["name"] for e in agent["env"]}
    assert {"STACKFLEET_NATS__URL", "STACKFLEET_HOST_NAME", "STACKFLEET_METADATA__KUBELET_URL"} <= env
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["ClusterRoleBinding"]["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"]
    agg = docs["Deployment"]["spec"]["template"]["spec"]
    assert agg["securityContext"]["runAsNonRoot"] is True


def test_heap_sampler_drop_in_verifies_on_a_service(tmp_path: Path) -> None:
    # Installed as an operator would: <service>.service.d/ next to the service's unit. A typo
    # in the drop-in must be reported, which shows systemd-analyze really read it.
    def verify(drop_in_text: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "demo.service").write_text("[Service]\nExecStart=/bin/true\n")
        (tmp_path / "demo.service.d").mkdir(exist_ok=True)
        (tmp_path / "demo.service.d" / "stackfleet-heap-sampler.conf").write_text(drop_in_text)
        return subprocess.run(["systemd-analyze", "verify", str(tmp_path / "demo.service")], capture_output=True,
                              text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})

    text = (DEPLOY / "systemd" / "stackfleet-heap-sampler.conf").read_text()
    assert "LD_PRELOAD=/usr/local/lib/stackfleet/libstackfleet_heap.so" in text
    good = verify(text)
    assert good.returncode == 0 and not good.stderr.strip(), good.stderr
    assert "Environmentt" in verify(text.replace("Environment=", "Environmentt=")).stderr
