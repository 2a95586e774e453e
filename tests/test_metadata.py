"""Process metadata: cgroup parsing, kubelet pod lists, service-name rules, the resolver."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from agent.metadata.cgroup import parse_cgroup_file, parse_cgroup_path
from agent.metadata.kubelet import parse_pod_list
from agent.metadata.resolver import MetadataResolver, executable_name
from agent.metadata.service_name import ProcessFacts, service_name
from agent.metadata.settings import MetadataSettings, ServiceRule
from agent.process.watcher import ProcessWatcher
from shared.counters import Counters

CID = "3f2a" * 16
POD = "0f6d2c1e-8b7a-4c3d-9e2f-1a2b3c4d5e6f"


@pytest.mark.parametrize(("path", "container", "pod"), [
    # kubelet, systemd cgroup driver, containerd
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/"
     f"cri-containerd-{CID}.scope", CID, POD),
    # kubelet, cgroupfs driver
    (f"/kubepods/besteffort/pod{POD}/{CID}", CID, POD),
    # CRI-O
    (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope", CID, POD),
    # Docker with systemd, Docker with cgroupfs, Podman
    (f"/system.slice/docker-{CID}.scope", CID, ""),
    (f"/docker/{CID}", CID, ""),
    (f"/machine.slice/libpod-{CID}.scope/container", CID, ""),
    # not containers
    ("/user.slice/user-0.slice/session-3.scope", "", ""),
    ("/", "", ""),
    (f"/system.slice/{CID[:63]}.scope", "", ""),
])
def test_cgroup_paths(path: str, container: str, pod: str) -> None:
    info = parse_cgroup_path(path)
    assert (info.container_id, info.pod_uid) == (container, pod)


def test_cgroup_file_prefers_a_line_naming_a_container() -> None:
    text = f"12:memory:/\n1:name=systemd:/docker/{CID}\n0::/\n"
    info = parse_cgroup_file(text)
    assert info.container_id == CID
    assert parse_cgroup_file("0::/init.scope\n").path == "/init.scope"
    assert parse_cgroup_file("garbage\n").container_id == ""


def _pod_list() -> dict[str, object]:
    return {"kind": "PodList", "items": [
        {"metadata": {"name": "checkout-7d9f", "namespace": "shop", "uid": POD,
                      "labels": {"app.kubernetes.io/name": "checkout"}},
         "status": {"containerStatuses": [{"name": "app", "containerID": f"containerd://{CID}"}],
                    "initContainerStatuses": [{"name": "init", "containerID": "containerd://" + "1" * 64}]}},
        {"metadata": {"name": "no-uid"}},
        "not a pod",
        {"metadata": {"name": "pending", "namespace": "shop", "uid": "u2"}, "status": {}},
    ]}


def test_pod_list_parsing_skips_malformed_items() -> None:
    pods = parse_pod_list(_pod_list())
    assert set(pods) == {POD, "u2"}
    assert pods[POD].containers == {CID: "app", "1" * 64: "init"}
    assert pods[POD].labels["app.kubernetes.io/name"] == "checkout"
    assert parse_pod_list([1, 2]) == {} and parse_pod_list({"items": "x"}) == {}


def test_service_name_order() -> None:
    s = MetadataSettings(service_rules=[ServiceRule(service="db-{comm}", comm="^postgres"),
                                        ServiceRule(service="{namespace}/{container}", cgroup="kubepods")])
    base = ProcessFacts("postgres", "postgres", "/", {})
    assert service_name(s, base) == ("db-postgres", "rule")
    with_env = ProcessFacts("postgres", "postgres", "/", {"OTEL_SERVICE_NAME": "orders-db"})
    assert service_name(s, with_env) == ("orders-db", "env:OTEL_SERVICE_NAME")
    pod = ProcessFacts("java", "java", "/kubepods/x", {}, "p", "shop", "app", (("app.kubernetes.io/name", "cart"),))
    assert service_name(s, pod) == ("cart", "pod_label")
    unlabeled = ProcessFacts("java", "java", "/kubepods/x", {}, "p", "shop", "app")
    assert service_name(s, unlabeled) == ("shop/app", "rule")
    assert service_name(s, ProcessFacts("sleep", "sleep", "/", {})) == ("", "")
    with pytest.raises(ValueError):
        ServiceRule(service="x", comm="(")


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    """A /proc-shaped directory with one containerised process (pid 100) and one plain (200)."""
    for pid, cgroup, env in ((100, f"0::/kubepods/burstable/pod{POD}/{CID}\n", b"A=1\0OTEL_SERVICE_NAME=\0"),
                             (200, "0::/user.slice\n", b"OTEL_SERVICE_NAME=billing\0PATH=/bin\0")):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cgroup").write_text(cgroup)
        (d / "comm").write_text("worker\n")
        (d / "environ").write_bytes(env)
        os.symlink("/usr/bin/worker-daemon", d / "exe")  # the comm is "worker"
    return tmp_path


class _Kubelet(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        code = 200 if self.path == "/pods" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body if code == 200 else b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def kubelet() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Kubelet)
    _Kubelet.body = b'{"items": []}'
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_resolver_with_kubelet(fake_proc: Path, kubelet: str) -> None:
    counters = Counters()
    r = MetadataResolver(MetadataSettings(kubelet_url=kubelet, kubelet_token_file=None), counters, str(fake_proc))
    # The kubelet does not list the pod yet: container and pod uid from the cgroup only.
    r.refresh_kubelet()
    r.resolve_many([100, 200, 999])
    assert r.cached(100) == {"container.id": CID, "k8s.pod.uid": POD, "process.executable.name": "worker-daemon"}
    assert r.cached(200) == {"service.name": "billing", "process.executable.name": "worker-daemon"}
    assert r.cached(999) == {}  # gone: nothing to add, counted
    assert counters.get("metadata_unreadable", reason="FileNotFoundError") == 1
    # Once it does, the entry waiting for a pod name expires and is resolved again; until
    # then its samples keep what was read.
    _Kubelet.body = json.dumps(_pod_list()).encode()
    r.refresh_kubelet()
    assert set(r.stale([(100, ''), (200, '')])) == {100}
    assert r.cached(100) == {"container.id": CID, "k8s.pod.uid": POD, "process.executable.name": "worker-daemon"}
    assert set(r.stale([(200, 'renamed')])) == {200}
    r.resolve_many([100])
    assert r.cached(100) == {"container.id": CID, "k8s.pod.uid": POD, "k8s.pod.name": "checkout-7d9f",
                             "k8s.namespace.name": "shop", "k8s.container.name": "app", "service.name": "checkout",
                             "process.executable.name": "worker-daemon"}


def test_resolver_survives_a_kubelet_that_is_down(fake_proc: Path) -> None:
    counters = Counters()
    r = MetadataResolver(MetadataSettings(kubelet_url="http://127.0.0.1:9", kubelet_token_file=None),
                         counters, str(fake_proc))
    r.refresh_kubelet()
    assert counters.get("kubelet_refreshes", result="failed") == 1
    r.resolve_many([100])
    assert r.cached(100) == {"container.id": CID, "k8s.pod.uid": POD, "process.executable.name": "worker-daemon"}


def test_scan_resolves_live_processes_and_keeps_what_it_learned(fake_proc: Path) -> None:
    r = MetadataResolver(MetadataSettings(), Counters(), str(fake_proc))
    assert r.scan() == 2
    assert r.cached(200) == {"service.name": "billing", "process.executable.name": "worker-daemon"}
    # The process exits: a later resolution keeps what was learned while it lived.
    for f in (fake_proc / "200").iterdir():
        f.unlink()
    (fake_proc / "200").rmdir()
    r.resolve_many({200: "worker"})
    assert r.cached(200) == {"service.name": "billing", "process.executable.name": "worker-daemon"}


def test_an_expired_entry_is_stale_but_still_gives_its_attributes(fake_proc: Path) -> None:
    """Expiry asks for a new resolution; until it happens, the process's samples carry what
    was read last (a batch's lookups come after the resolution of its other processes, in a
    thread, during which a fresh entry can expire)."""
    r = MetadataResolver(MetadataSettings(cache_ttl_s=0.05), Counters(), str(fake_proc))
    r.resolve_many([200])
    assert r.stale([(200, "worker")]) == {}
    time.sleep(0.1)
    assert r.stale([(200, "worker")]) == {200: "worker"}
    assert r.cached(200) == {"service.name": "billing", "process.executable.name": "worker-daemon"}
    assert r.cached(999) is None  # never resolved


def test_scan_with_the_watcher_reads_only_processes_that_started(fake_proc: Path) -> None:
    """With the agent's process watcher, a scan resolves what the watcher saw start and
    nothing else: entries that expired (here at once) are not read again by the scan; the
    samples of such a process renew it (``stale``). A new process is resolved by the next scan."""
    resolved: list[int] = []

    class Counting(MetadataResolver):
        def resolve(self, pid: int) -> tuple[dict[str, str] | None, str]:
            resolved.append(pid)
            return super().resolve(pid)

    def stat(pid: int) -> None:  # what the watcher reads (started at boot: not young)
        (fake_proc / str(pid) / "stat").write_text(f"{pid} (worker) S " + "0 " * 18 + "1 " + "0 " * 30 + "\n")

    stat(100)
    stat(200)
    watcher = ProcessWatcher(Counters(), proc=str(fake_proc))
    r = Counting(MetadataSettings(cache_ttl_s=1e-9), Counters(), str(fake_proc), processes=watcher)
    assert r.scan() == 2 and sorted(resolved) == [100, 200]
    assert r.scan() == 0 and len(resolved) == 2  # both expired, neither read again
    assert set(r.stale([(100, ""), (200, "")])) == {100, 200}
    new = fake_proc / "300"
    new.mkdir()
    (new / "cgroup").write_text("0::/user.slice\n")
    (new / "comm").write_text("late\n")
    (new / "environ").write_bytes(b"OTEL_SERVICE_NAME=late\0")
    os.symlink("/usr/bin/late", new / "exe")
    stat(300)
    watcher.scan()
    assert r.scan() == 1 and resolved[2:] == [300]
    r.close()


def test_resolver_cache_is_bounded(fake_proc: Path) -> None:
    r = MetadataResolver(MetadataSettings(max_cached_processes=16), Counters(), str(fake_proc))
    r.resolve_many(range(1000, 1100))
    assert len(r._cache) == 16


def test_executable_name_is_the_exe_links_base_name() -> None:
    assert executable_name("/usr/local/bin/python3.11") == "python3.11"
    assert executable_name("/memfd:sealed-91 (deleted)") == "memfd:sealed-91"
    assert executable_name("/opt/app/server (deleted)") == "server"


def test_an_earlier_reading_of_proc_does_not_overwrite_a_later_one(fake_proc: Path) -> None:
    """The scan thread reads a process just before it execs and is descheduled; the sink, seeing
    samples under the new name, resolves it after the exec; then the scan stores what it read.
    The later reading must stay, or the next samples get the old executable's name."""
    read_before_exec, resume_scan = threading.Event(), threading.Event()

    class PausedScan(MetadataResolver):
        def resolve(self, pid: int) -> tuple[dict[str, str] | None, str]:
            out = super().resolve(pid)
            if threading.current_thread().name == "scan":
                read_before_exec.set()
                resume_scan.wait(10)
            return out

    r = PausedScan(MetadataSettings(), Counters(), str(fake_proc))
    scan = threading.Thread(target=r.resolve_many, args=([200],), name="scan")
    scan.start()
    assert read_before_exec.wait(10)
    (fake_proc / "200" / "exe").unlink()  # the exec: a new executable and comm
    os.symlink("/opt/app/cpu_chain", fake_proc / "200" / "exe")
    (fake_proc / "200" / "comm").write_text("cpu_chain\n")
    r.resolve_many({200: "cpu_chain"})
    resume_scan.set()
    scan.join(10)
    assert (r.cached(200) or {}).get("process.executable.name") == "cpu_chain"
    assert r.stale([(200, "cpu_chain")]) == {}
    assert r.counters.get("metadata_resolutions_superseded") == 1
