"""Go symbolization on the real kernel, for every Go release installed and for the
nats-server binary the project ships.

- The go_spin workload built stripped (``-s -w``: no symbol table, names only from the
  pclntab) by every toolchain, all running at once under one agent: each process's CPU
  samples are in main.spin with file and line, and samples inside code the compiler inlined
  (main.step into main.spin) show the inlined function on top of its caller, each with its
  own line.
- nats-server (built by go1.27, whose pclntab header has a text start of 0), under a publish
  load: the Go frames of its CPU samples equal `go tool addr2line` (function, file, line)
  and `go tool nm` (the symbol covering the address) of that binary, for at least 20
  distinct sampled addresses.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import subprocess
from pathlib import Path

import nats
import pytest
from elftools.elf.elffile import ELFFile

from agent.runtimes.go.buildinfo import go_runtime_info
from integration.go_toolchains import GoToolchain, available, newest
from integration.harness import WORKLOADS, PipelineRun, run_pipeline
from shared.model import FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer, find_nats_server
from tests.conftest import GO_CACHE

SPIN_SECONDS = 6.0
TOOLCHAINS = available()
SOURCE = (WORKLOADS / "go_spin" / "main.go").read_text().splitlines()


def source_line(marker: str) -> int:
    return next(i for i, text in enumerate(SOURCE, 1) if marker in text)


@pytest.fixture(scope="module")
def spin_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineRun, dict[str, int]]:
    out = tmp_path_factory.mktemp("go_spin")
    exes = {t.version: t.build(WORKLOADS / "go_spin", out / f"go_spin-{t.version}", "stripped",
                               cache=GO_CACHE / t.version) for t in TOOLCHAINS}
    for exe in exes.values():
        sections = subprocess.run(["readelf", "-S", "-W", str(exe)], capture_output=True, text=True).stdout
        assert " .symtab " not in sections
    pids: dict[str, int] = {}

    async def workload(run: PipelineRun) -> None:
        procs = []
        for version, exe in exes.items():
            procs.append(await asyncio.create_subprocess_exec(str(exe), str(SPIN_SECONDS),
                                                              stdin=asyncio.subprocess.PIPE))
            pids[version] = procs[-1].pid
        await asyncio.sleep(SPIN_SECONDS)
        # After spinning the programs wait, idle, for stdin to close: they live until the
        # agent has exported all their samples (a loaded agent symbolizes late, and a gone
        # process cannot be symbolized). Done when the count has not moved for 3 s.
        loop = asyncio.get_running_loop()
        deadline, counts = loop.time() + 60.0, [-1]
        while loop.time() < deadline:
            counts.append(sum(len(s.timestamps_ns) for pid in pids.values()
                              for s in run.samples(ProfileType.CPU, pid)))
            if len(counts) > 6 and counts[-1] == counts[-7] and counts[-1] > 0:
                break
            await asyncio.sleep(0.5)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        await asyncio.gather(*(p.wait() for p in procs))

    with NatsServer() as server:
        run = asyncio.run(run_pipeline(server.url, [ProfileType.CPU], workload, export_interval_s=1.0))
    return run, pids


@pytest.mark.parametrize("toolchain", [pytest.param(t, id=t.version) for t in TOOLCHAINS])
def test_stripped_go_binary_gets_named_frames_in_cpu_profile(spin_runs: tuple[PipelineRun, dict[str, int]],
                                                            toolchain: GoToolchain) -> None:
    run, pids = spin_runs
    samples = run.samples(ProfileType.CPU, pids[toolchain.version])
    total = sum(len(s.timestamps_ns) for s in samples)
    spin = [s for s in samples if any(f.function == "main.spin" for f in s.frames)]
    assert total >= 20 and sum(len(s.timestamps_ns) for s in spin) >= 0.8 * total, \
        [[(f.function, hex(f.address)) for f in s.frames] for s in samples[:3]]
    frame = next(f for f in spin[0].frames if f.function == "main.spin")
    assert frame.frame_type == FrameType.GO and frame.filename.endswith("go_spin/main.go") and frame.line > 0
    assert any(f.function == "main.main" for f in spin[0].frames)
    body_line, call_line = source_line("// step body"), source_line("// call step")
    inlined = 0
    for s in spin:
        names = [f.function for f in s.frames]
        if "main.step" in names:
            i = names.index("main.step")
            step, caller = s.frames[i], s.frames[i + 1]
            assert (step.line, caller.function, caller.line) == (body_line, "main.spin", call_line), s.frames
            assert step.address == caller.address and step.filename == caller.filename  # one PC, two frames
            inlined += len(s.timestamps_ns)
    # The multiply-add is a good part of the loop; the loop control and time.Now are spin's own.
    assert inlined >= 0.1 * total, (inlined, total)


def test_go_version_and_build_id_match_the_go_tool(tmp_path: Path) -> None:
    toolchain = newest()
    exe = toolchain.build(WORKLOADS / "go_spin", tmp_path / "go_spin", cache=GO_CACHE / toolchain.version)
    st = os.stat(exe)
    info = go_runtime_info(str(exe), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    assert info is not None and info.startpc_offset is not None and not info.unsupported
    env = toolchain.env(GO_CACHE / toolchain.version)
    version = subprocess.run([str(toolchain.go), "version", str(exe)], capture_output=True, text=True, check=True,
                             env=env).stdout
    build_id = subprocess.run([str(toolchain.go), "tool", "buildid", str(exe)], capture_output=True, text=True,
                              check=True, env=env).stdout.strip()
    assert info.go_version == f"go{toolchain.version}" and info.go_version in version
    assert info.build_id == build_id
    assert {name for name, _ in info.entries} == {"runtime.newproc1", "runtime.goexit1"}
    nm = toolchain.tool("nm", str(exe), cache=GO_CACHE / toolchain.version)
    symbols = {line.split()[2]: int(line.split()[0], 16) for line in nm.splitlines() if len(line.split()) == 3}
    assert all(symbols[name] == address for name, address in info.entries)


def nats_server_load_run() -> tuple[PipelineRun, int]:
    """CPU profile while a second nats-server relays a publish/subscribe load for 6 s."""
    box: dict[str, int] = {}

    async def workload(run: PipelineRun) -> None:
        with NatsServer(jetstream=False) as loaded:
            assert loaded.process is not None
            box["pid"] = loaded.process.pid
            publisher, subscriber = await nats.connect(loaded.url), await nats.connect(loaded.url)
            received = 0

            async def count(_msg: object) -> None:
                nonlocal received
                received += 1

            await subscriber.subscribe("load", cb=count)
            payload = os.urandom(1024)
            end = asyncio.get_running_loop().time() + 6.0
            while asyncio.get_running_loop().time() < end:
                for _ in range(200):
                    await publisher.publish("load", payload)
                await publisher.flush()
            await publisher.close()
            await subscriber.close()
            assert received > 0

    with NatsServer() as server:
        run = asyncio.run(run_pipeline(server.url, [ProfileType.CPU], workload, export_interval_s=1.0))
    return run, box["pid"]


@functools.cache
def load_segments(binary: str) -> tuple[tuple[int, int, int], ...]:
    """(file offset, size in the file, link-time address) of each PT_LOAD segment."""
    with open(binary, "rb") as f:
        return tuple((s["p_offset"], s["p_filesz"], s["p_vaddr"]) for s in ELFFile(f).iter_segments("PT_LOAD"))


def virtual_address(binary: str, file_offset: int) -> int:
    """The link-time address of a file offset (frames carry module-relative file offsets; the
    Go tools answer for link-time addresses): through the PT_LOAD segment that holds it."""
    for offset, size, vaddr in load_segments(binary):
        if offset <= file_offset < offset + size:
            return file_offset - offset + vaddr
    raise AssertionError(f"offset {file_offset:#x} is in no loaded segment of {binary}")


def test_nats_server_frames_match_go_tools() -> None:
    binary = os.path.realpath(find_nats_server())
    toolchain = newest()  # go1.27's tools read the go1.27.2 binary
    run, pid = nats_server_load_run()
    # (address looked up, physical function, innermost file, innermost line) per sampled frame
    # group: frames of one address are its inlined calls, innermost first; the user leaf is
    # looked up as is, a caller's return address at address - 1 (the call instruction).
    looked_up: dict[int, tuple[str, str, int]] = {}
    for sample in run.samples(ProfileType.CPU, pid):
        groups: list[list] = []  # type: ignore[type-arg]
        for frame in sample.frames:
            if frame.frame_type == FrameType.KERNEL:  # the user stack's leaf comes after these
                continue
            if frame.frame_type != FrameType.GO or frame.mapping is None or frame.mapping.filename != binary:
                groups.append([])
                continue
            if groups and groups[-1] and groups[-1][-1].address == frame.address:
                groups[-1].append(frame)
            else:
                groups.append([frame])
        for depth, group in enumerate(groups):
            if group:
                address = virtual_address(binary, group[0].address)
                address = address if depth == 0 else address - 1
                looked_up[address] = (group[-1].function, group[0].filename, group[0].line)
    assert len(looked_up) >= 20, len(looked_up)
    addresses = sorted(looked_up)
    answer = subprocess.run([str(toolchain.go), "tool", "addr2line", binary], capture_output=True, text=True,
                            check=True, env=toolchain.env(GO_CACHE / toolchain.version),
                            input="".join(f"{a:#x}\n" for a in addresses)).stdout.splitlines()
    nm = toolchain.tool("nm", "-n", binary, cache=GO_CACHE / toolchain.version).splitlines()
    text = [(int(f[0], 16), f[2].removesuffix(".abi0")) for f in (line.split(maxsplit=2) for line in nm)
            if len(f) == 3 and f[1] in "Tt"]  # (generic names hold spaces)
    starts = [start for start, _ in text]
    for k, address in enumerate(addresses):
        function, file, line = looked_up[address]
        truth_file, truth_line = answer[2 * k + 1].rsplit(":", 1)
        assert (function, file, line) == (answer[2 * k], truth_file, int(truth_line)), hex(address)
        symbol = text[bisect.bisect_right(starts, address) - 1][1]
        assert symbol == function or function.startswith(("type:.eq.", "type..eq.")), (hex(address), symbol)
