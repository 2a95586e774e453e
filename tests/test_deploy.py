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


# ---- the installer (stackfleet/install.py); the whole path runs in integration/test_install.py ----

def _ready_machine(root: Path) -> Path:
    """A file tree with everything the agent checks for."""
    import platform

    (root / "sys/kernel/tracing/events").mkdir(parents=True)
    (root / "lib/modules" / platform.release() / "build/include").mkdir(parents=True)
    (root / "sys/kernel/btf").mkdir(parents=True)
    (root / "sys/kernel/btf/vmlinux").write_bytes(b"BTF")
    return root


def test_install_checks_name_each_missing_kernel_feature(tmp_path: Path) -> None:
    from stackfleet.install import agent_problems

    root = _ready_machine(tmp_path)
    assert agent_problems(root) == []  # and this machine's real bpf() and /usr/bin/python3 with bcc
    (root / "sys/kernel/tracing/events").rmdir()
    (root / "sys/kernel/btf/vmlinux").unlink()
    shutil.rmtree(root / "lib/modules")
    problems = agent_problems(root, bpf_error=lambda: "Operation not permitted",
                              python=Path("/nonexistent/python3"))
    assert len(problems) == 5, problems
    assert "bpf() syscall fails (Operation not permitted)" in problems[0]
    assert "mount -t tracefs nodev /sys/kernel/tracing" in problems[1]
    assert "apt-get install linux-headers-" in problems[2]
    assert "CONFIG_DEBUG_INFO_BTF" in problems[3]
    assert "apt-get install python3 python3-venv" in problems[4]


def test_install_checks_an_interpreter_without_bcc(tmp_path: Path) -> None:
    from stackfleet.install import agent_problems, aggregator_problems

    python = Path(sys.base_prefix) / "bin" / "python3"  # this interpreter without the venv's packages
    no_bcc = tmp_path / "python3"
    no_bcc.write_text(f"#!/bin/sh\nexec {python} -I -S \"$@\"\n")  # -S: no site-packages, so no bcc
    no_bcc.chmod(0o755)
    (problem,) = agent_problems(_ready_machine(tmp_path / "root"), python=no_bcc)
    assert "cannot import venv, ensurepip, bcc" in problem and "python3-bpfcc" in problem
    assert aggregator_problems(python=no_bcc) == []  # the aggregator needs no bcc


def test_units_render_for_a_prefix() -> None:
    from stackfleet.install import Layout, render_unit

    layout = Layout(Path("/srv/sf"), Path("/srv/conf"), Path("/run/units"))
    text = render_unit((DEPLOY / "systemd" / "stackfleet-agent.service").read_text(), layout)
    assert "ExecStart=/srv/sf/.venv/bin/stackfleet agent" in text
    assert "EnvironmentFile=-/srv/conf/agent.env" in text and "STACKFLEET_CONFIG=/srv/conf/stackfleet.toml" in text
    assert "/opt/stackfleet" not in text and "/etc/stackfleet" not in text


def test_uninstall_hands_shared_files_to_the_other_component(tmp_path: Path) -> None:
    """Both components installed, removed in either order: nothing stays, nothing foreign goes."""
    from stackfleet.install import CONFIG_FILE_TEXT, Layout, Manifest, uninstall

    for first, second in (("agent", "aggregator"), ("aggregator", "agent")):
        root = tmp_path / first
        (root / "etc").mkdir(parents=True)
        (root / "etc/operator-notes").write_text("not ours")
        layout = Layout(root / "opt/sf", root / "etc/sf", root / "etc/units")
        for component in (first, second):  # what install() records, without pip
            manifest = Manifest(layout.manifest(component))
            manifest.mkdir(layout.venv / "bin")
            manifest.write(layout.config_dir / f"{component}.env", "STACKFLEET_NATS__URL=nats://x:4222\n", 0o600)
            if not (layout.config_dir / "stackfleet.toml").exists():
                manifest.write(layout.config_dir / "stackfleet.toml", CONFIG_FILE_TEXT)
                manifest.config_file_text = CONFIG_FILE_TEXT
            manifest.write(layout.unit(component), "[Unit]\n")
            manifest.save()
        uninstall(first, layout, keep_data=True)
        assert (layout.config_dir / "stackfleet.toml").exists() and layout.venv.exists()
        assert not layout.unit(first).exists() and layout.unit(second).exists()
        uninstall(second, layout, keep_data=True)
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["etc", "etc/operator-notes"]


def test_a_failed_install_can_be_uninstalled(tmp_path: Path) -> None:
    """A step that fails (here: no wheel) after the venv exists leaves a manifest that uninstall follows."""
    from stackfleet.install import InstallError, Layout, install, uninstall

    layout = Layout(tmp_path / "opt/sf", tmp_path / "etc/sf", tmp_path / "units")
    with pytest.raises(InstallError, match="no wheel at"):
        install("aggregator", "nats://x:4222", layout, wheel=tmp_path / "missing.whl", start=False, check=False)
    assert (layout.venv / "bin" / "python").exists()
    uninstall("aggregator", layout, keep_data=True)
    assert list(tmp_path.iterdir()) == []


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
