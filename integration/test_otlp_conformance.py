"""Every export of a real run conforms: all five profile types, Go and Python workloads.

The agent profiles cpu, wall, lock, heap and goroutine on this kernel while a Go CPU spinner
(named by its own OTEL_SERVICE_NAME; ``step`` is inlined into ``spin``; its executable's
name is longer than the 15-character comm), a Go program with
goroutines, a Go allocator (heap read from its runtime's own profile), a Python script and a C lock-contention
program run; the aggregator exports every 1.5 s to local files and to a real gRPC
ProfilesService. Every ``.otlp.pb`` written and every request received must break none of
the rules of :mod:`aggregator.otlp.checks` (profcheck with all options, the proto's MUSTs,
Pyroscope's and Elastic's acceptance), and carry the semantic conventions consumers read:
resource per process with ``service.name`` and ``process.executable.name`` = base name of
/proc/PID/exe, the profiler in the scope, build ids on mappings (Go build id =
``go tool buildid``, kernel's from /sys/kernel/notes). Google pprof names a workload's
executable as the main binary of the CPU pprof and shows ``<module>`` for the script's
module-level frame.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from agent.symbols.file_ids import kernel_build_id
from aggregator.otlp.checks import check_request
from aggregator.otlp.decode import profile_column
from integration.go_toolchains import system
from integration.harness import WORKLOADS, PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer
from tests.otlp_server import OtlpTestServer

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"
PY_SCRIPT = WORKLOADS / "py_chain.py"
ALL_TYPES = list(ProfileType)


def build_go(name: str, out: Path, exe_name: str = "") -> Path:
    return system().build(WORKLOADS / name, out / (exe_name or name), cache=out / "gocache")


class Run:
    def __init__(self, pipeline: PipelineRun, received: list[Any], out_dir: Path, pids: dict[str, int],
                 exes: dict[str, str], binaries: dict[str, Path]) -> None:
        self.pipeline, self.received, self.out_dir = pipeline, received, out_dir
        self.pids, self.exes, self.binaries = pids, exes, binaries

    def stored(self) -> list[ExportProfilesServiceRequest]:
        out = []
        for f in sorted(self.out_dir.glob("*.otlp.pb")):
            req = ExportProfilesServiceRequest()
            req.ParseFromString(f.read_bytes())
            out.append(req)
        return out


@pytest.fixture(scope="module")
def conformance_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("conformance")
    binaries = {name: build_go(name, tmp) for name in ("goroutines", "go_heap")}
    # A name longer than the kernel's 15-character comm: process.executable.name must be the whole name.
    binaries["go_spin"] = build_go("go_spin", tmp, "go_spin_long_executable")
    binaries["lock_contention"] = build_c("lock_contention.c", tmp)
    pids: dict[str, int] = {}
    exes: dict[str, str] = {}

    async def workload(run: PipelineRun) -> None:
        spin = await asyncio.create_subprocess_exec(str(binaries["go_spin"]), "9",
                                                    env={**os.environ, "OTEL_SERVICE_NAME": "spinner"})
        gor = await asyncio.create_subprocess_exec(str(binaries["goroutines"]), stdin=asyncio.subprocess.PIPE,
                                                   stdout=asyncio.subprocess.PIPE)
        alloc = await asyncio.create_subprocess_exec(str(binaries["go_heap"]), str(tmp / "go_heap_own"),
                                                     stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        py = await asyncio.create_subprocess_exec("/usr/bin/python3.11", str(PY_SCRIPT), "5",
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        procs = {"go_spin": spin, "goroutines": gor, "go_heap": alloc, "python": py}
        for proc in (gor, alloc, py):
            assert proc.stdout is not None
            await proc.stdout.readline()  # ready
        for name, proc in procs.items():
            pids[name] = proc.pid
            exes[name] = os.path.basename(os.readlink(f"/proc/{proc.pid}/exe"))
        await asyncio.sleep(2.5)  # the scans find and probe the processes
        # The heap actor reads the Go allocator's own profile (a busy machine can take a while).
        for _ in range(100):
            if run.agent_counters.get("go_heap_processes_read") >= 1:
                break
            await asyncio.sleep(0.2)
        for proc in (gor, alloc, py):
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        lock = await asyncio.create_subprocess_exec(str(binaries["lock_contention"]), "4", "400", "1000",
                                                    stdout=asyncio.subprocess.DEVNULL)
        pids["lock_contention"] = lock.pid
        for _ in range(2):  # several export intervals with every type; allocations in each
            await asyncio.sleep(2.5)
            assert alloc.stdin is not None
            alloc.stdin.write(b"go\n")
            await alloc.stdin.drain()
        for proc in (gor, alloc):
            assert proc.stdin is not None
            proc.stdin.write(b"exit\n")
            await proc.stdin.drain()
        for proc in (*procs.values(), lock):
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    comms = r"^(go_spin_long_ex|goroutines|go_heap|python3\.11|lock_contention)$"
    with NatsServer() as nats, OtlpTestServer() as server:
        pipeline = asyncio.run(run_pipeline(
            nats.url, ALL_TYPES, workload, output_dir=tmp / "profiles", otlp_endpoint=server.endpoint,
            export_interval_s=1.5, agent_overrides={"target_comm": comms, "heap_sample_bytes": 64 * 1024,
                                                                "heap_go_interval_s": 1.0},
            aggregator_overrides={"resource_attributes": {"deployment.environment": "conformance"}}))
        server.wait_for_requests(len([r for r in pipeline.requests if r.resource_profiles]), 15)
        received = list(server.requests)
    return Run(pipeline, received, tmp / "profiles", pids, exes, binaries)


def test_every_export_conforms_and_holds_every_type(conformance_run: Run) -> None:
    stored, received = conformance_run.stored(), conformance_run.received
    assert len(stored) >= 4 and len(received) >= 4, (len(stored), len(received))
    for source, requests in (("file", stored), ("grpc", received)):
        for i, req in enumerate(requests):
            violations = check_request(req)
            assert violations == [], f"{source} request {i}: {violations[:10]}"
    types = set()
    for req in received:
        for rp in req.resource_profiles:
            for sp in rp.scope_profiles:
                for prof in sp.profiles:
                    column = profile_column(req.dictionary.string_table, prof)
                    if column is not None and prof.samples:
                        types.add(column[0])
    counters = conformance_run.pipeline.agent_counters.snapshot()
    assert types == set(ALL_TYPES), (types, {k: v for k, v in counters.items() if "heap" in k or "probe" in k})


def _resources(requests: list[Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for req in requests:
        for rp in req.resource_profiles:
            attrs = {a.key: a.value.string_value or a.value.int_value for a in rp.resource.attributes}
            out[int(attrs["process.pid"])] = attrs
            (sp,) = rp.scope_profiles
            assert (sp.scope.name, sp.scope.version) == ("stackfleet", version("stackfleet"))
    return out


def test_resources_describe_the_profiled_processes(conformance_run: Run) -> None:
    resources = _resources(conformance_run.received)
    pids, exes = conformance_run.pids, conformance_run.exes
    for name in ("go_spin", "goroutines", "go_heap", "python"):
        attrs = resources[pids[name]]
        assert attrs["process.executable.name"] == exes[name], (name, attrs)
        assert attrs["deployment.environment"] == "conformance" and attrs["host.name"]
    assert exes["python"] == "python3.11" and exes["go_spin"] == "go_spin_long_executable"
    assert resources[pids["go_spin"]]["service.name"] == "spinner"  # the process's own OTEL_SERVICE_NAME
    assert resources[pids["python"]]["service.name"] == f"unknown_service:{exes['python']}"


def test_mappings_carry_build_ids(conformance_run: Run) -> None:
    binary = conformance_run.binaries["go_spin"]
    go_id = system().tool("buildid", str(binary)).strip()
    seen_go = seen_kernel = False
    inlined: set[tuple[str, ...]] = set()
    for req in conformance_run.received:
        d = req.dictionary
        s = d.string_table
        for m in d.mapping_table[1:]:
            attrs = {s[d.attribute_table[a].key_strindex]: d.attribute_table[a].value.string_value
                     for a in m.attribute_indices}
            assert len(attrs["process.executable.build_id.htlhash"]) == 32
            if s[m.filename_strindex] == str(binary):
                seen_go |= attrs.get("process.executable.build_id.go") == go_id
            if s[m.filename_strindex] == "[kernel.kallsyms]" and m.memory_limit:
                seen_kernel |= attrs.get("process.executable.build_id.gnu") == kernel_build_id() != ""
        for loc in d.location_table:
            if len(loc.lines) > 1:
                inlined.add(tuple(s[d.function_table[line.function_index].name_strindex] for line in loc.lines))
    assert seen_go and seen_kernel
    assert ("main.step", "main.spin") in inlined, inlined  # step is inlined into spin: one location, 2 lines


def test_pprof_names_a_process_executable_as_main_binary_and_shows_python_modules(conformance_run: Run) -> None:
    """The host runs other processes too (the heaviest one is the main binary): the first mapping
    must be one of the export's process executables, never the kernel or a library, also in an
    interval whose only samples have no frame in their executable (the agent's own: a library
    leaf and Python frames; kernel threads)."""
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    checked = 0
    for path in sorted(conformance_run.out_dir.glob("2*.cpu.pb.gz")):  # not the latest.* links
        stamp = path.name.split(".", 1)[0]
        req = ExportProfilesServiceRequest()
        req.ParseFromString((conformance_run.out_dir / f"{stamp}.otlp.pb").read_bytes())
        executables = {a.value.string_value for rp in req.resource_profiles for a in rp.resource.attributes
                       if a.key == "process.executable.name"}
        top = subprocess.run([str(PPROF), "-top", "-nodefraction=0", str(path)], capture_output=True, text=True,
                             check=True).stdout
        first = top.splitlines()[0]
        if not first.startswith("File: "):
            assert "Total samples = 0" in top, top  # only an interval without CPU samples names no binary
            continue
        # A program run from a deleted file or a memfd is named after its mapping, which keeps
        # the kernel's " (deleted)"; its executable name does not.
        main_binary = first.removeprefix("File: ").removesuffix(" (deleted)")
        assert main_binary in executables, (main_binary, sorted(executables))
        if "<module>" in top:
            assert "<unknown>" not in top, top
            checked += 1
    assert checked, "no CPU pprof showed the script's <module> frame"
