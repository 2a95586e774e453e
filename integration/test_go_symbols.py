"""Go symbolization on the real kernel: a stripped Go binary still gets named frames."""

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
        proc = await asyncio.create_subprocess_exec(str(exe), "3")
        box["pid"] = proc.pid
        await proc.wait()

    with NatsServer() as nats:
        run = asyncio.run(run_pipeline(nats.url, [ProfileType.CPU], workload, export_interval_s=1.0))
    samples = run.samples(ProfileType.CPU, box["pid"])
    total = sum(len(s.timestamps_ns) for s in samples)
    spin = [s for s in samples if any(f.function == "main.spin" for f in s.frames)]
    assert total and sum(len(s.timestamps_ns) for s in spin) >= 0.8 * total
    frame = next(f for f in spin[0].frames if f.function == "main.spin")
    assert frame.frame_type == FrameType.GO and frame.filename.endswith("go_spin/main.go") and frame.line > 0
    assert any(f.function == "main.main" for f in spin[0].frames)


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
