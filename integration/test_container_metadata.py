"""Container, Kubernetes and service.name attributes on real samples.

One workload runs inside a cgroup laid out exactly as the kubelet (systemd driver) and
containerd lay out a pod's container; a fake kubelet — a local HTTP server answering ``/pods``
with a PodList naming that pod and container — stands in for the node's kubelet. A second
workload runs outside any container and names its service through ``OTEL_SERVICE_NAME`` in its
environment; a third is named by a configured rule. The real agent profiles all three; the
exported samples and the OTLP request must carry the right attributes for each.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from agent.metadata.settings import MetadataSettings, ServiceRule
from integration.harness import PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer

CONTAINER_ID = uuid.uuid4().hex + uuid.uuid4().hex
POD_UID = str(uuid.uuid4())
POD_LIST = {"kind": "PodList", "items": [{
    "metadata": {"name": "checkout-5c7d", "namespace": "shop", "uid": POD_UID,
                 "labels": {"app.kubernetes.io/name": "checkout"}},
    "status": {"containerStatuses": [{"name": "app", "containerID": f"containerd://{CONTAINER_ID}"}]},
}]}


def _cgroup2_mount() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return Path(fields[1])
    pytest.fail("no cgroup2 hierarchy mounted")


@pytest.fixture
def pod_cgroup() -> Iterator[Path]:
    """A kubelet-style pod/container cgroup; removed (leaf first) after the test."""
    root = _cgroup2_mount()
    slices = ["kubepods.slice", "kubepods-burstable.slice",
              f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice", f"cri-containerd-{CONTAINER_ID}.scope"]
    dirs = [root.joinpath(*slices[: i + 1]) for i in range(len(slices))]
    for d in dirs:
        d.mkdir(exist_ok=True)
    yield dirs[-1]
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass  # a parent that existed before (or still has members) stays


class _Kubelet(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(POD_LIST).encode() if self.path == "/pods" else b"{}"
        self.send_response(200 if self.path == "/pods" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kubelet_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Kubelet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _attrs(run: PipelineRun, pid: int) -> set[tuple[tuple[str, str], ...]]:
    return {s.attributes for s in run.samples(ProfileType.CPU, pid)}


def test_samples_carry_container_pod_and_service(tmp_path: Path, pod_cgroup: Path, kubelet_url: str) -> None:
    exe = build_c("cpu_chain.c", tmp_path)
    ruled = tmp_path / "batch_job"
    os.link(exe, ruled)
    pids: dict[str, int] = {}

    async def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    env={**os.environ, **(env or {})})
        pids[name] = proc.pid
        await proc.communicate()
        assert proc.returncode == 0

    async def workload(run: PipelineRun) -> None:
        # The shell joins the pod's cgroup, then becomes the workload (same pid).
        in_pod = ["sh", "-c", f'echo $$ > {pod_cgroup}/cgroup.procs && exec {exe} 3 1']
        await asyncio.gather(spawn("pod", in_pod),
                             spawn("env", [str(exe), "3", "1"], {"OTEL_SERVICE_NAME": "billing"}),
                             spawn("rule", [str(ruled), "3", "1"]))

    metadata = MetadataSettings(kubelet_url=kubelet_url, kubelet_token_file=None,
                                service_rules=[ServiceRule(service="jobs-{comm}", comm="^batch_job$")])
    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload,
                                       agent_overrides={"metadata": metadata}))

    assert run.samples(ProfileType.CPU, pids["pod"]), "no samples of the pod's process"
    pod_attrs = _attrs(run, pids["pod"])
    expected = {("container.id", CONTAINER_ID), ("k8s.pod.uid", POD_UID), ("k8s.pod.name", "checkout-5c7d"),
                ("k8s.namespace.name", "shop"), ("k8s.container.name", "app"), ("service.name", "checkout")}
    assert all(expected <= set(a) for a in pod_attrs), pod_attrs

    env_attrs = _attrs(run, pids["env"])
    assert env_attrs and all(dict(a).get("service.name") == "billing" and "container.id" not in dict(a)
                             for a in env_attrs), env_attrs
    rule_attrs = _attrs(run, pids["rule"])
    assert rule_attrs and all(dict(a).get("service.name") == "jobs-batch_job" for a in rule_attrs), rule_attrs
    assert run.agent_counters.get("service_names", source="pod_label") >= 1

    # The OTLP export carries them on the resource of the pod's process.
    resources = [{a.key: a.value.string_value or a.value.int_value for a in rp.resource.attributes}
                 for r in run.requests for rp in r.resource_profiles]
    pod = [a for a in resources if a["process.pid"] == pids["pod"]]
    assert pod and all(a["k8s.pod.name"] == "checkout-5c7d" and a["container.id"] == CONTAINER_ID
                       and a["service.name"] == "checkout" for a in pod), pod
