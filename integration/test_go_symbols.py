"""Go symbolization on the real kernel: a stripped Go binary still gets named frames, and
samples inside code the compiler inlined (main.step into main.spin) show the inlined
function on top of its caller, each with its own line."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from agent.go_runtime import go_runtime_info
from integration.harness import WORKLOADS, PipelineRun, run_pipeline
from shared.model import FrameType
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer


def build(out: Path, *flags: str) -> Path:
    exe = out / "go_spin"
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(out / "cache"), "GOFLAGS": ""}
    subprocess.run(["go", "build", *flags, "-o", str(exe), "main.go"], cwd=WORKLOADS / "go_spin", env=env, check=True)
    return exe


def test_stripped_go_binary_gets_named_frames_in_cpu_profile(tmp_path: Path) -> None:
    exe = build(tmp_path, "-ldflags=-s -w")
    assert " .symtab " not in subprocess.run(["readelf", "-S", "-W", str(exe)], capture_output=True, text=True).stdout
    box: dict[str, int] = {}

    async def workload(run: PipelineRun) -> None:
        # 6 s: long enough to be symbolized while it lives, even on a loaded machine.
        proc = await asyncio.create_subprocess_exec(str(exe), "6")
        box["pid"] = proc.pid
        await proc.wait()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload, export_interval_s=1.0))
    samples = run.samples(ProfileType.CPU, box["pid"])
    total = sum(len(s.timestamps_ns) for s in samples)
    spin = [s for s in samples if any(f.function == "main.spin" for f in s.frames)]
    assert total and sum(len(s.timestamps_ns) for s in spin) >= 0.8 * total, \
        [[(f.function, hex(f.address)) for f in s.frames] for s in samples[:3]]
    frame = next(f for f in spin[0].frames if f.function == "main.spin")
    assert frame.frame_type == FrameType.GO and frame.filename.endswith("go_spin/main.go") and frame.line > 0
    assert any(f.function == "main.main" for f in spin[0].frames)
    source = (WORKLOADS / "go_spin" / "main.go").read_text().splitlines()
    body_line = next(i for i, text in enumerate(source, 1) if "// step body" in text)
    call_line = next(i for i, text in enumerate(source, 1) if "// call step" in text)
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
    exe = build(tmp_path)
    st = os.stat(exe)
    info = go_runtime_info(str(exe), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    assert info is not None and info.startpc_offset is not None
    env = {**os.environ, "GOCACHE": str(tmp_path / "cache")}
    version = subprocess.run(["go", "version", str(exe)], capture_output=True, text=True, check=True, env=env).stdout
    build_id = subprocess.run(["go", "tool", "buildid", str(exe)], capture_output=True, text=True, check=True,
                              env=env).stdout.strip()
    assert info.go_version and info.go_version in version
    assert info.build_id == build_id
    assert {name for name, _ in info.entries} == {"runtime.newproc1", "runtime.goexit1", "runtime.mallocgc"}
