"""Deployment files are checked by the tools that will read them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stackfleet.nats_server import find_nats_server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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
    env = {**os.environ, "AGENT_PASSWORD": "a", "AGGREGATOR_PASSWORD": "b"}
    result = subprocess.run([find_nats_server(), "-t", "-c", str(DEPLOY / "nats" / "nats-server.conf")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_kubernetes_manifests_have_what_the_agent_needs() -> None:
    docs = {d["kind"]: d for f in (DEPLOY / "kubernetes").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())}
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
