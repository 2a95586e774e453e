"""Agent configuration: every option from ``STACKFLEET_*`` env vars, a TOML file or the CLI."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.memory_budget import DEFAULT_BUDGET_BYTES
from agent.metadata.settings import MetadataSettings
from shared.config_file import file_source
from shared.nats_connection import NatsSettings
from shared.profile_types import ProfileType

log = logging.getLogger(__name__)

# Settings that were replaced: their old names are no longer read, and saying so beats
# ignoring them silently (extra="ignore" would).
RENAMED_SETTINGS = {"max_pending_events": "max_pending_bytes"}


class AgentSettings(BaseSettings):
    """Settings of one host agent. Nested NATS options: ``STACKFLEET_NATS__URL`` etc."""

    model_config = SettingsConfigDict(env_prefix="STACKFLEET_", env_nested_delimiter="__", extra="ignore")

    nats: NatsSettings = Field(default_factory=NatsSettings)
    host_name: str = Field(default_factory=socket.gethostname)
    # Comma-separated in env/CLI ("cpu,wall"); NoDecode stops pydantic-settings expecting JSON.
    # Heap is on by default: for Go processes it reads the runtime's own profile (no probes,
    # ~zero cost: docs/design/heap.md); native processes are probed only when selected.
    types: Annotated[list[ProfileType], NoDecode] = Field(
        default_factory=lambda: [ProfileType.CPU, ProfileType.HEAP])
    frequency_hz: int = Field(default=99, ge=1, le=1000)
    # The longest a sample waits in the agent before it is published. Each flush has a fixed
    # cost (symbolization hop, counters, encoding, one NATS publication): at 99 Hz on a few
    # CPUs it is most of the agent's CPU, so flushes are rare and come early when records pile
    # up (agent/actors/flush.py). Wall and lock drain at least every second (their in-kernel
    # maps are sized for it) and hold the samples to publish them at this interval. Ten
    # seconds, as continuous profilers commonly report: a CPU flush costs ~3.5 ms of fixed
    # work, 0.35 ms a second at this interval (docs/design/overhead.md, "Fixed work per
    # second" and "Wake-ups and the agent's own stacks").
    flush_interval_s: float = Field(default=10.0, gt=0, le=60)
    # Raw records waiting for symbolization per actor, in bytes (each record's payload plus
    # ~41 bytes of Python object): beyond this the oldest are dropped and counted; half of it
    # brings a flush forward. In bytes because records differ 70-fold: 32 MiB is ~7,900 whole
    # 4 KiB records (40 s of CPU samples at 99 Hz x 2 CPUs, enough to ride out a stalled
    # symbolizer) or ~340,000 56-byte id records, so at 999 Hz id records wait for the flush
    # interval rather than flushing every ~2 s (docs/design/overhead.md, "A byte bound for
    # pending records").
    max_pending_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    ringbuf_pages: int = Field(default=256, ge=8)
    # Outgoing NATS messages waiting to be published (e.g. while NATS is unreachable); beyond
    # either bound the oldest are dropped and counted. At one message per flush per profile
    # type (at most one a second) the defaults hold well over an hour of a CPU-only agent
    # (docs/design/durability.md).
    max_outgoing_messages: int = Field(default=10_000, ge=10)
    max_outgoing_bytes: int = Field(default=32 * 1024 * 1024, ge=64 * 1024)
    # Optional disk spool instead of memory for the outgoing messages (survives an agent
    # restart); capped at spool_max_bytes of payload, oldest dropped and counted beyond.
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=64 * 1024)
    # Entries per dictionary table (strings, mappings, functions, locations, stacks) before the
    # stream starts a new epoch and sends what it uses again. Memory: ~650 B per stack entry of
    # 20 frames, per profile type (docs/design/overhead.md). A quiet host's few thousand stacks
    # never reach it.
    max_dictionary_entries: int = Field(default=16_384, ge=100)
    # One budget in bytes for the caches that grow with what the host runs: the wire
    # dictionaries, the symbolizer's address and frame caches, the CPython frame caches and
    # the CPU actor's symbolized stacks (agent/memory_budget.py). Each cache has a fixed share
    # and evicts its oldest entries beyond it, counted as cache_evictions{cache=...}. Chosen
    # so the agent stays under 150 MB RSS with cpu,wall,lock,goroutine on a churning host
    # (docs/design/overhead.md, "One memory budget for the caches").
    cache_memory_bytes: int = Field(default=DEFAULT_BUDGET_BYTES, ge=1024 * 1024)
    # Process selection for the event-tracing actors (wall, lock, heap); none set = all user processes.
    target_pids: Annotated[list[int], NoDecode] = Field(default_factory=list)
    target_comm: str | None = None
    target_cgroup: str | None = None
    # Heap: mean bytes between allocation samples (geometric sampling, as tcmalloc and Go).
    heap_sample_bytes: int = Field(default=512 * 1024, ge=1)
    # Heap, Go processes: seconds between reads of each Go runtime's own profile (agent/runtimes/go/heap_profiles.py).
    heap_go_interval_s: float = Field(default=5.0, gt=0, le=3600)
    # Futex waits shorter than this are only counted (no stack): uncontended fast paths.
    lock_min_wait_ns: int = Field(default=10_000, ge=0)
    # With the wall profile on too, lock waits are taken from the wall program's switch-outs
    # (bpf/lock_from_switch.h: no futex system-call tracepoints, which cost every futex call and,
    # while enabled, every system call of the host); their stacks then follow the wall's capture
    # rate and budget. Off: the lock program's own tracepoints (bpf/lock.bpf.c), which also see
    # waits that never sleep.
    lock_waits_from_wall: bool = True
    # Off-CPU periods shorter than this are summed per thread without a stack.
    wall_min_block_ns: int = Field(default=1_000_000, ge=0)
    # Off-CPU stacks: a thread switching out more often than this many times a second has its
    # switch-out stack captured about this often, at random; its other long blocks are summed
    # and spread over its captured stacks (bpf/wall.bpf.c, agent/actors/wall.py: per-thread
    # totals exact, the cost bounded on busy hosts). Slower threads are captured at every
    # switch-out. 0: capture every switch-out.
    wall_capture_rate_hz: int = Field(default=99, ge=0, le=40_000)
    # Lock waits (longer than lock_min_wait_ns): the same per-thread rate for wait stacks; the
    # other waits' delay and count are shared out over the thread's captured waits on the same
    # lock (agent/actors/lock.py). 0: capture every wait.
    lock_capture_rate_hz: int = Field(default=99, ge=0, le=40_000)
    # Wall and lock, each: stack captures per CPU per second, whatever the number of threads
    # (bpf/event_capture.h: a per-CPU probability from the last 100 ms's demand, hard cap at
    # twice the budget per 100 ms). Bounds the BPF cost under event storms; a lower budget costs
    # less and leaves more of each thread's time estimated (per-thread totals stay exact:
    # docs/design/wall-and-lock.md). 0: no budget.
    capture_budget_per_cpu_hz: int = Field(default=50, ge=0, le=100_000)
    # Wall and lock aggregate in BPF (bpf/stack_agg.h): entries per flush window in each of
    # the two aggregation maps, and distinct stacks kept (LRU, ~4.2 KiB each in the kernel).
    agg_map_entries: int = Field(default=16384, ge=16, le=1 << 20)
    agg_stack_entries: int = Field(default=4096, ge=256, le=1 << 18)
    # CPU profile: distinct stacks BPF keeps to send later samples as ids (LRU, ~4.4 KiB
    # each in the kernel; docs/design/stack-dedup.md). The agent caches as many symbolized.
    cpu_known_stacks: int = Field(default=4096, ge=256, le=1 << 18)
    # On: stacks deduplicated in the kernel (bpf/cpu.bpf.c, docs/design/stack-dedup.md).
    # Off: the fallback, one whole 4.4 KiB record per CPU sample (bpf/cpu_records.bpf.c).
    cpu_stack_dedup: bool = True
    # CPU profile: the agent's own samples are kept one in this many, at random, each weighing
    # that many periods (an estimate of its own CPU time, unbiased; 1: every sample). Nearly
    # every sample of the agent is a new stack to symbolize, ~1.5 ms each at 999 Hz
    # (docs/design/overhead.md, "Wake-ups and the agent's own stacks, seventh round").
    cpu_self_sample_one_in: int = Field(default=32, ge=1, le=1024)
    # CPU, wall and lock profiles: unwind user stacks from DWARF CFI inside BPF, one shared set
    # of tables (docs/design/native-unwinding.md); off = frame pointers only.
    # unwind_table_rows sizes the BPF row table (12 bytes a row).
    native_unwinding: bool = True
    unwind_table_rows: int = Field(default=1 << 20, ge=1 << 12, le=1 << 24)
    # Where distributions install separate debug files (names of stripped libraries' local
    # functions, lines): ".build-id/xx/rest.debug" and ".gnu_debuglink" layouts under each.
    debug_directories: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["/usr/lib/debug"])
    # "host:port" for /metrics and /healthz; None disables (port 0 picks a free one).
    metrics_address: str | None = None
    # "host": every process on the machine. "network_namespace": only processes sharing the
    # agent's network namespace (several logical hosts on one kernel; samples of others are
    # counted as samples_out_of_scope and dropped).
    process_scope: Literal["host", "network_namespace"] = "host"
    # Container / Kubernetes / service.name attributes on samples (STACKFLEET_METADATA__*).
    metadata: MetadataSettings = Field(default_factory=MetadataSettings)
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 30.0

    @model_validator(mode="before")
    @classmethod
    def _warn_of_renamed(cls, data: object) -> object:
        given = set(data) if isinstance(data, dict) else set()
        prefix = cls.model_config.get("env_prefix", "")
        given |= {name for name in RENAMED_SETTINGS if f"{prefix}{name}".upper() in os.environ}
        for old in sorted(given & RENAMED_SETTINGS.keys()):
            log.warning("setting %s is no longer read: it was replaced by %s (see agent/settings.py)",
                        old, RENAMED_SETTINGS[old])
        return data

    @field_validator("nats")
    @classmethod
    def _tcp_only(cls, v: NatsSettings) -> NatsSettings:
        # The agent process does not load nats-py's WebSocket transport (agent/lean_imports.py).
        if any(u.strip().lower().startswith(("ws://", "wss://")) for u in v.url.split(",")):
            raise ValueError("the agent connects to NATS over TCP: use nats:// or tls:// URLs, not ws:// or wss://")
        return v

    @field_validator("types", "target_pids", "debug_directories", mode="before")
    @classmethod
    def _split_list(cls, v: object) -> object:
        if isinstance(v, str):
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """CLI/init beats env beats the TOML file named by $STACKFLEET_CONFIG."""
        return (init_settings, env_settings, file_source(settings_cls, "agent"))

