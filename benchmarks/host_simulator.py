"""Simulated agent traffic for N hosts, for measuring the aggregator without N machines.

Each simulated host owns a realistic stack population (a few hundred distinct stacks over
shared libraries and host-specific binaries, Zipf-distributed popularity, 15-30 frames
deep) and emits what a real agent would: CPU samples at ``hz`` x ``cpus`` per second,
batched once per second through the real :class:`shared.wire.StreamEncoder`, so message
sizes and dictionary traffic match the real wire format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from shared.model import Frame, FrameType, Mapping, Sample
from shared.profile_types import ProfileType
from shared.wire import StreamEncoder, new_agent_id

LIBC = Mapping(0x7F0000000000, 0x7F00001C0000, 0, "/usr/lib/x86_64-linux-gnu/libc.so.6", "a1b2c3d4e5f6")
LIBPY = Mapping(0x7F1000000000, 0x7F1000400000, 0, "/usr/lib/libpython3.11.so.1.0", "0f1e2d3c4b5a")


def _frames_pool(rng: random.Random, host_index: int, n: int) -> list[Frame]:
    app = Mapping(0x400000, 0x900000, 0, f"/srv/app{host_index % 20}/bin/server", f"{host_index % 20:040x}")
    pool = []
    for i in range(n):
        mapping = (LIBC, LIBPY, app, app)[i % 4]
        pool.append(Frame(f"fn_{mapping.filename.rsplit('/', 1)[-1]}_{i}", f"src/module_{i % 37}.c",
                          10 + i % 500, mapping.start + 0x1000 + 16 * i, FrameType.NATIVE, mapping))
    return pool


@dataclass
class SimulatedHost:
    """One fake host: its stack population and its encoder (one stream, CPU type)."""

    index: int
    distinct_stacks: int = 300
    seed: int = 0
    encoder: StreamEncoder = field(init=False)
    stacks: list[tuple[Frame, ...]] = field(init=False)
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed * 1_000_003 + self.index)
        self.name = f"sim-host-{self.index:05d}"
        self.encoder = StreamEncoder(self.name, ProfileType.CPU, new_agent_id())
        pool = _frames_pool(rng, self.index, 2000)
        self.stacks = [tuple(rng.sample(pool, rng.randint(15, 30))) for _ in range(self.distinct_stacks)]
        self.weights = [1.0 / (rank + 1) for rank in range(self.distinct_stacks)]  # Zipf
        self._rng = rng
        self.pids = [rng.randint(1000, 60000) for _ in range(12)]

    def batch(self, start_ns: int, seconds: float, hz: int, cpus: int) -> list[Sample]:
        """Samples a real agent would flush after ``seconds`` of ``cpus`` busy CPUs."""
        n = int(hz * cpus * seconds)
        period = 1_000_000_000 // hz
        chosen = self._rng.choices(range(self.distinct_stacks), self.weights, k=n)
        out = []
        for i, s in enumerate(chosen):
            pid = self.pids[s % len(self.pids)]
            out.append(Sample(start_ns + i * period // cpus, i % cpus, pid, pid + s % 4, "worker", "server",
                              self.stacks[s], (period,)))
        return out

    def encode(self, start_ns: int, seconds: float, hz: int, cpus: int) -> tuple[bytes | None, bytes | None]:
        return self.encoder.encode(self.batch(start_ns, seconds, hz, cpus), 1_000_000_000 // hz)
