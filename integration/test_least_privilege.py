"""The agent with only its documented capabilities: same attachments, same profiles.

The capability set is read from the shipped systemd unit (``CapabilityBoundingSet=``), so the
documentation and the test cannot drift apart. The agent runs as a subprocess under
``setpriv`` with its bounding, permitted, effective and ambient sets cut down to exactly that
list (uid 0 stays, as in the unit). It must attach every actor and produce, for a known CPU
workload, the full user chain to the hot function and named kernel frames — the same answers
the fully privileged integration tests get. The aggregator runs in this process as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aggregator.profile import FleetProfiles
from aggregator.service import run_aggregator
from aggregator.settings import AggregatorSettings
from integration.harness import build_c
from shared.counters import Counters
from shared.model import FrameType
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer, free_port

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "stackfleet-agent.service"
TYPES = ["cpu", "wall", "lock", "goroutine"]
CHAIN = ["hot_leaf", "middle", "outer", "run_thread"]
SECONDS = 4


def unit_capabilities() -> list[str]:
    """Capability names (``bpf``, ``perfmon``, ...) from the unit's CapabilityBoundingSet."""
    text = UNIT.read_text()
    match = re.search(r"^CapabilityBoundingSet=(.+)$", text, re.MULTILINE)
    assert match, "agent unit has no CapabilityBoundingSet"
    return [c.removeprefix("CAP_").lower() for c in match.group(1).split()]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        return str(resp.read().decode())


def _effective_caps(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff line")


CAP_SYS_ADMIN = 21
CAP_NUMBERS = {"bpf": 39, "perfmon": 38, "sys_ptrace": 19, "sys_resource": 24, "syslog": 34}


def _own_bounding_set() -> set[str]:
    status = Path("/proc/self/status").read_text()
    bits = int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)  # type: ignore[union-attr]
    return {name for name, bit in CAP_NUMBERS.items() if bits & (1 << bit)}


async def _wait_attached(agent: subprocess.Popen[bytes], port: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            out = agent.stdout.read().decode(errors="replace") if agent.stdout else ""
            raise AssertionError(f"agent exited with {agent.returncode}:\n{out[-3000:]}")
        with contextlib.suppress(OSError):
            text = await asyncio.to_thread(_metrics, port)
            if all(f'actor_started_total{{type="{t}"}}' in text for t in TYPES):
                return text
        await asyncio.sleep(0.5)
    raise AssertionError(f"actors not attached within {timeout_s}s; metrics:\n{text}")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_agent_with_documented_capabilities_only(tmp_path: Path) -> None:
    caps = unit_capabilities()
    assert "sys_admin" not in caps
    assert set(caps) <= set(CAP_NUMBERS), f"unit lists capabilities this test does not know: {caps}"
    exe = build_c("cpu_chain.c", tmp_path)
    fleets: list[FleetProfiles] = []
    metrics_port = free_port()

    async def scenario(nats_url: str) -> tuple[int, int, float]:
        stop, counters = asyncio.Event(), Counters()
        settings = AggregatorSettings(nats=NatsSettings(url=nats_url), otlp_endpoint="", output_dir=None,
                                      export_interval_s=1.0)
        agg = asyncio.create_task(run_aggregator(settings, stop, counters, lambda f, _r: fleets.append(f)))
        # uid 0 gets its bounding set as permitted/effective on exec, so cutting the bounding set
        # is enough (and is what the unit's CapabilityBoundingSet does). Capabilities this test
        # process does not have itself (a sandbox may lack CAP_SYS_RESOURCE) cannot be granted.
        bounding = ",".join(["-all"] + [f"+{c}" for c in caps if c in _own_bounding_set()])
        cmd = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
               "--", sys.executable, "-m", "stackfleet.cli", "agent", "--nats", nats_url,
               "--types", ",".join(TYPES), "--log-level", "INFO"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "STACKFLEET_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
               "STACKFLEET_FLUSH_INTERVAL_S": "0.5", "STACKFLEET_TARGET_COMM": "^cpu_chain$"}
        agent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            await _wait_attached(agent, metrics_port, 240)
            agent_caps = _effective_caps(agent.pid)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            workload = await asyncio.create_subprocess_exec(str(exe), str(SECONDS), "2",
                                                            stdout=asyncio.subprocess.PIPE)
            await workload.communicate()
            assert workload.returncode == 0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            workload_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            await asyncio.sleep(2)
            final = await asyncio.to_thread(_metrics, metrics_port)
        finally:
            agent.terminate()
            try:
                out, _ = await asyncio.to_thread(agent.communicate, timeout=30)
            except subprocess.TimeoutExpired:
                agent.kill()
                out, _ = agent.communicate()
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.wait_for(agg, 30)
        log = out.decode(errors="replace")
        # Counted, expected refusals (e.g. another user namespace's environ) are in the final
        # counters line; what must not appear is a crash or an unexpected permission failure.
        assert "Traceback" not in log and "Operation not permitted" not in log, log[-3000:]
        assert 'actor_failed' not in final, final
        return workload.pid, agent_caps, workload_cpu_s

    with NatsServer() as nats:
        pid, agent_caps, workload_cpu_s = asyncio.run(scenario(nats.url))

    allowed = sum(1 << CAP_NUMBERS[c] for c in caps)
    assert agent_caps & ~allowed == 0, f"agent has capabilities beyond the unit's: {agent_caps:x}"
    assert not agent_caps & (1 << CAP_SYS_ADMIN)
    assert agent_caps & (1 << CAP_NUMBERS["bpf"]), "agent ran without CAP_BPF"

    cpu = [s for f in fleets for (_, t), p in f.hosts.items() if t == ProfileType.CPU
           for s in p.samples.values() if s.pid == pid]
    total = sum(len(s.timestamps_ns) for s in cpu)
    seen = {(t.value, s.pid) for f in fleets for (_, t), p in f.hosts.items() for s in p.samples.values()}
    # Expected samples follow the CPU time the workload actually got (the host may be busy).
    assert total >= 0.5 * 99 * workload_cpu_s, (
        f"only {total} CPU samples for {workload_cpu_s:.1f} CPU s of pid {pid}; seen {sorted(seen)[:20]}")
    chained = 0
    for s in cpu:
        user = [f.function for f in s.frames if f.frame_type != FrameType.KERNEL]
        # hot_leaf calls clock_gettime (vDSO), so the chain may start one frame in.
        i = user.index("hot_leaf") if "hot_leaf" in user else -1
        if i >= 0 and user[i : i + len(CHAIN)] == CHAIN:
            chained += len(s.timestamps_ns)
    assert chained / total >= 0.9, f"{chained}/{total} samples with {CHAIN}"
    # Kernel frames need CAP_SYSLOG to be named from kallsyms. The busy loop stays in user
    # space (its kernel-mode samples are a few at exec and exit, by chance), so the check
    # takes every process's CPU samples: the NATS server, this test's aggregator and the
    # agent itself enter the kernel all the time.
    with_kernel = kernel_named = 0
    for s in (s for f in fleets for (_, t), p in f.hosts.items() if t == ProfileType.CPU for s in p.samples.values()):
        kernel = [f for f in s.frames if f.frame_type == FrameType.KERNEL]
        if kernel:
            with_kernel += len(s.timestamps_ns)
            if all(f.function and not f.function.startswith("0x") for f in kernel):
                kernel_named += len(s.timestamps_ns)
    print(f"{kernel_named} of {with_kernel} CPU samples with kernel frames have every kernel frame named")
    assert with_kernel > 0, "no CPU sample with kernel frames from any process"
    assert kernel_named >= 0.5 * with_kernel, f"only {kernel_named} of {with_kernel} kernel stacks fully named"

    wall = [s for f in fleets for (_, t), p in f.hosts.items() if t == ProfileType.WALL
            for s in p.samples.values() if s.pid == pid]
    assert any(fr.function == "hot_leaf" for s in wall for fr in s.frames), "wall profile misses hot_leaf"
