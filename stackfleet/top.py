"""``stackfleet top``: a live terminal view of the hottest functions across the fleet.

Built as an *ad-hoc NATS subscriber* on the public subjects — no aggregator involved — to
show that the subjects and wire format are usable by anyone: it subscribes to dictionaries
and samples (plainly, not in the aggregators' queue group, so it takes nothing away from
them), asks agents for their dictionaries once, and keeps a sliding window of samples.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aggregator.delivery.intake import Intake
from aggregator.exporters.pprof import unknown_frame_label
from shared.counters import Counters
from shared.model import Frame
from shared.nats_connection import NatsSettings, connect
from shared.profile_types import PROFILE_TYPES, ProfileType
from shared.subjects import RESYNC_SUBJECT, dict_wildcard, samples_wildcard
from shared.wire import DecodedSamples, resync_request


def frame_label(frame: Frame) -> str:
    """Function name with file:line, or the address and mapping when unsymbolized."""
    if frame.function:
        where = f" {frame.filename.rsplit('/', 1)[-1]}:{frame.line}" if frame.filename and frame.line else ""
        return f"{frame.function}{where}"
    return unknown_frame_label(frame)


@dataclass
class HotFunctions:
    """Self and total value per function over a sliding time window."""

    window_s: float = 10.0
    value_index: int = 0
    batches: deque[tuple[float, Counter[str], Counter[str], int]] = field(default_factory=deque)

    def add(self, batch: DecodedSamples) -> None:
        self_values: Counter[str] = Counter()
        total_values: Counter[str] = Counter()
        grand = 0
        for sample in batch.samples:
            value = sample.values[self.value_index]
            grand += value
            if not sample.frames:
                continue
            self_values[frame_label(sample.frames[0])] += value
            for label in {frame_label(f) for f in sample.frames}:
                total_values[label] += value
        self.batches.append((time.monotonic(), self_values, total_values, grand))

    def top(self, n: int) -> tuple[list[tuple[str, int, int]], int]:
        cutoff = time.monotonic() - self.window_s
        while self.batches and self.batches[0][0] < cutoff:
            self.batches.popleft()
        self_sum: Counter[str] = Counter()
        total_sum: Counter[str] = Counter()
        grand = 0
        for _, s, t, g in self.batches:
            self_sum.update(s)
            total_sum.update(t)
            grand += g
        rows = [(name, value, total_sum[name]) for name, value in self_sum.most_common(n)]
        return rows, grand


def render(hot: HotFunctions, profile_type: ProfileType, host: str | None, n: int) -> Table:
    rows, grand = hot.top(n)
    unit = PROFILE_TYPES[profile_type].sample_types[hot.value_index].unit
    table = Table(title=f"stackfleet top — {profile_type.value} ({unit}), "
                        f"{host or 'all hosts'}, last {hot.window_s:g}s")
    table.add_column("self %", justify="right")
    table.add_column("total %", justify="right")
    table.add_column("self", justify="right")
    table.add_column("function")
    for name, self_value, total in rows:
        table.add_row(f"{100 * self_value / grand:.1f}" if grand else "-",
                      f"{100 * total / grand:.1f}" if grand else "-", f"{self_value:,}", name)
    return table


class NatsUnreachable(ConnectionError):
    """No NATS server answered: the message says what to check."""


async def run_top(
    nats: NatsSettings,
    profile_type: ProfileType,
    host: str | None,
    rows: int,
    window_s: float,
    stop: asyncio.Event,
    console: Console | None = None,
) -> HotFunctions:
    """Subscribe, render every second until ``stop``; returns the final window (for tests)."""
    hot = HotFunctions(window_s=window_s)
    try:  # nats-py would wait for a server forever; an interactive tool says so and stops
        nc = await asyncio.wait_for(connect(nats, name="stackfleet-top"), 2 * nats.connect_timeout_s)
    except TimeoutError as exc:
        raise NatsUnreachable(f"cannot reach NATS at {nats.url} within {2 * nats.connect_timeout_s:.0f} s: is "
                              "nats-server (or `stackfleet run`) running there? Pass --nats URL otherwise") from exc

    async def ask(h: str, ptype: ProfileType, reason: str) -> None:
        await nc.publish(RESYNC_SUBJECT, resync_request(h, [ptype], reason))

    intake = Intake(Counters(), hot.add, ask)

    async def on_dict(msg: Msg) -> None:
        await intake.on_dict(msg.subject, msg.data)

    async def on_samples(msg: Msg) -> None:
        await intake.on_samples(msg.subject, msg.data)

    await nc.subscribe(dict_wildcard(profile_type, host), cb=on_dict)
    await nc.subscribe(samples_wildcard(profile_type, host), cb=on_samples)
    await nc.publish(RESYNC_SUBJECT, resync_request(host or "*", [profile_type], "stackfleet top"))
    console = console or Console()
    try:
        with Live(render(hot, profile_type, host, rows), console=console, refresh_per_second=2) as live:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
                await intake.sweep()
                live.update(render(hot, profile_type, host, rows))
    finally:
        await nc.close()
    return hot
