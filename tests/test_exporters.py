"""Exporters against real peers: a real gRPC server, Google's pprof, the filesystem."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from aggregator.exporters.files import LocalFileWriter
from aggregator.exporters.grpc import OtlpGrpcExporter
from aggregator.exporters.pprof import write_pprof
from aggregator.otlp.encode import encode_request
from aggregator.profile import FleetProfiles, HostProfile
from shared.model import KERNEL_FILENAME, Frame, FrameType, Mapping
from shared.profile_types import ProfileType
from stackfleet.nats_server import free_port
from tests.otlp_server import OtlpTestServer
from tests.test_otlp import fleet

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"


async def test_grpc_export_reaches_a_real_server() -> None:
    req = encode_request(fleet(), "svc", "1")
    with OtlpTestServer() as server:
        exporter = OtlpGrpcExporter(server.endpoint, timeout_s=5)
        assert await exporter.export(req)
        await exporter.close()
    assert server.requests == [req]


async def test_dead_endpoint_fails_bounded_then_recovers() -> None:
    port = free_port()
    exporter = OtlpGrpcExporter(f"http://127.0.0.1:{port}", timeout_s=2)
    req = encode_request(fleet(), "svc", "1")
    started = time.monotonic()
    assert await exporter.export(req) is False
    assert time.monotonic() - started < 10
    assert exporter.failed == 1
    with OtlpTestServer(port) as server:
        assert await exporter.export(req)
        assert len(server.requests) == 1
    await exporter.close()


def pprof_top(path: Path, *args: str) -> str:
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    return subprocess.run([str(PPROF), "-top", *args, str(path)], capture_output=True, text=True, check=True).stdout


def test_pprof_file_is_read_by_google_pprof(tmp_path: Path) -> None:
    path = tmp_path / "cpu.pb.gz"
    write_pprof(str(path), fleet(), ProfileType.CPU)
    out = pprof_top(path)
    assert "leaf" in out and "schedule" in out
    lock = tmp_path / "lock.pb.gz"
    write_pprof(str(lock), fleet(), ProfileType.LOCK)
    assert "wait" in pprof_top(lock, "-sample_index=delay")


def test_pprof_names_the_main_binary_and_keeps_python_module_frames(tmp_path: Path) -> None:
    kernel = Mapping(0, 0x1000000, 0, KERNEL_FILENAME, "cd" * 20)
    python = Mapping(0x400000, 0x700000, 0, "/usr/bin/python3.11", "ee" * 20)
    libc = Mapping(0x7F0000000000, 0x7F0000200000, 0, "/usr/lib/x86_64-linux-gnu/libc.so.6", "ab" * 20)
    f = FleetProfiles(0, 10_000)
    hp = HostProfile("h", ProfileType.CPU, 1_000, 9_000, 10)
    stack = (Frame("do_syscall_64", "", 0, 0x1234, FrameType.KERNEL, kernel),
             Frame("read", "", 0, 0x7F0000001000, FrameType.NATIVE, libc),
             Frame("<module>", "/app/main.py", 3, 0, FrameType.CPYTHON),
             Frame("_PyEval_EvalFrameDefault", "", 0, 0x401000, FrameType.NATIVE, python),
             Frame("_start", "", 0, 0x400100, FrameType.NATIVE, python))
    hp.add(stack, 7, 7, "python3", "python3", 0, (("process.executable.name", "python3.11"),), (10,), 5_000)
    f.hosts[("h", ProfileType.CPU)] = hp
    path = tmp_path / "cpu.pb.gz"
    write_pprof(str(path), f, ProfileType.CPU)
    top = pprof_top(path)
    assert "File: python3.11" in top and "Build ID: " + "ee" * 20 in top  # the main binary is the first mapping
    assert "<module>" in top and "<unknown>" not in top


def test_pprof_names_the_process_executable_when_no_frame_lies_in_it(tmp_path: Path) -> None:
    """A process whose stacks hold only a library leaf and Python frames (the agent's own
    samples) is still named by its executable, not by the library pprof would find first."""
    libclang = Mapping(0x7F0000000000, 0x7F0002000000, 0, "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", "ab" * 20)
    f = FleetProfiles(0, 10_000)
    hp = HostProfile("h", ProfileType.CPU, 1_000, 9_000, 10)
    stack = (Frame("", "", 0, 0x7F0000001000, FrameType.NATIVE, libclang),
             Frame("compile", "/app/loader.py", 3, 0, FrameType.CPYTHON),
             Frame("<module>", "/app/main.py", 1, 0, FrameType.CPYTHON))
    hp.add(stack, 7, 7, "python3", "python3", 0, (("process.executable.name", "python3.11"),), (10,), 5_000)
    hp.add(stack[:1], 8, 8, "ls", "ls", 0, (("process.executable.name", "ls"),), (3,), 5_000)
    f.hosts[("h", ProfileType.CPU)] = hp
    path = tmp_path / "cpu.pb.gz"
    write_pprof(str(path), f, ProfileType.CPU)
    top = pprof_top(path)
    assert top.splitlines()[0] == "File: python3.11", top  # the heavier of the two executables
    assert "compile" in top and "libclang-cpp.so.14+0x1000" in top, top


def test_pprof_names_an_executable_run_from_a_deleted_file_or_memfd(tmp_path: Path) -> None:
    """A program run from a memfd (runc re-executes itself so; this machine's own tooling runs
    so) maps its code from ``/memfd:NAME (deleted)``, and its executable name has no
    " (deleted)": its own mapping is still the main binary. pprof drops a mapping name with a
    colon that is not a path, so an addressless stand-in named after the executable would
    leave the profile unnamed."""
    memfd = Mapping(0xA000, 0xDD000, 0xA000, "/memfd:sealed-91173221a7ea (deleted)")
    f = FleetProfiles(0, 10_000)
    hp = HostProfile("h", ProfileType.CPU, 1_000, 9_000, 10)
    stack = (Frame("recv_timeout", "", 0, 0xB000, FrameType.NATIVE, memfd),
             Frame("main", "", 0, 0xC000, FrameType.NATIVE, memfd))
    hp.add(stack, 7, 7, "memfd:sealed-91", "memfd:sealed-91", 0,
           (("process.executable.name", "memfd:sealed-91173221a7ea"),), (10,), 5_000)
    f.hosts[("h", ProfileType.CPU)] = hp
    path = tmp_path / "cpu.pb.gz"
    write_pprof(str(path), f, ProfileType.CPU)
    top = pprof_top(path)
    assert top.splitlines()[0] == "File: memfd:sealed-91173221a7ea (deleted)", top


def test_local_writer_is_atomic_and_bounded(tmp_path: Path) -> None:
    writer = LocalFileWriter(tmp_path, keep=2)
    f = fleet()
    req = encode_request(f, "svc", "1")
    for i in range(4):
        f.end_ns = 10_000_000_000 + i
        writer.write(f, req)
    assert len(list(tmp_path.glob("*.otlp.pb"))) == 2
    assert len(list(tmp_path.glob("[0-9]*.cpu.pb.gz"))) == 2
    assert (tmp_path / "latest.cpu.pb.gz").resolve().exists()
    assert not list(tmp_path.glob("*.tmp"))
