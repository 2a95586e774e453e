"""The agent's top level: publisher, shared symbolizer thread, supervisor of actors."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from agent.actors import ACTORS, ActorContext, ProfileActor
from agent.actors.base import SampleSink
from agent.clock import MonotonicToUnix
from agent.memory_budget import BudgetCollector, MemoryBudget
from agent.metadata.resolver import MetadataResolver
from agent.metadata.sink import MetadataSink
from agent.process.selectors import ProcessSelector
from agent.process.watcher import SCAN_INTERVAL_S, ProcessWatcher
from agent.publish.publisher import Publisher
from agent.runtimes.python import PythonProcesses
from agent.settings import AgentSettings
from agent.supervisor import Supervisor
from agent.symbols import Symbolizer
from agent.thread_names import name_os_thread
from agent.unwind import SharedUnwinding
from shared.counters import Counters
from shared.metrics_server import MetricsServer, metrics_registry, parse_address
from shared.profile_types import ProfileType

log = logging.getLogger(__name__)


async def run_agent(
    settings: AgentSettings,
    stop: asyncio.Event,
    counters: Counters | None = None,
    on_supervisor: Callable[[Supervisor], None] | None = None,
) -> Counters:
    """Run until ``stop`` is set; returns the counters (for tests and the final log line).

    ``on_supervisor`` receives the supervisor once it exists (tests use it to kill actors).
    """
    counters = counters or Counters()
    unknown = [t for t in settings.types if t not in ACTORS]
    if unknown:
        raise ValueError(f"profile types not implemented yet: {', '.join(unknown)}")
    # One byte budget for the caches that grow with what the host runs (agent/memory_budget.py).
    budget = MemoryBudget(settings.cache_memory_bytes, counters)
    publisher = Publisher(settings, counters, budget)
    await publisher.start()
    # One thread owns the symbolizer: its caches need no locks and actors share them.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="symbolize", initializer=name_os_thread)
    sink: SampleSink = publisher
    metadata: MetadataSink | None = None
    netns_scope = settings.process_scope == "network_namespace"
    # One /proc scanner for the actors and the metadata resolver (run by the supervisor).
    # The metadata resolver follows its scans (agent/metadata/sink.py): as often as it asks.
    interval = min(SCAN_INTERVAL_S, settings.metadata.scan_interval_s) if settings.metadata.enabled else SCAN_INTERVAL_S
    processes = ProcessWatcher(counters, ProcessSelector.from_settings(settings), interval)
    if settings.metadata.enabled or netns_scope:
        metadata = MetadataSink(publisher, MetadataResolver(settings.metadata, counters, processes=processes), counters,
                                add_attributes=settings.metadata.enabled, own_network_namespace_only=netns_scope)
        await metadata.start()
        sink = metadata
    # Created on first use by an actor, gone with the last: one table build per file for all types.
    unwinding = SharedUnwinding(counters, settings.unwind_table_rows) if settings.native_unwinding else None
    symbolizer = Symbolizer(debug_directories=settings.debug_directories, budget=budget)
    ctx = ActorContext(settings, symbolizer, executor, sink, counters, MonotonicToUnix(),
                       PythonProcesses(counters, budget=budget), unwinding, budget, watcher=processes)

    factories: dict[ProfileType, Callable[[], ProfileActor]] = {
        t: functools.partial(ACTORS[t], ctx) for t in settings.types
    }
    supervisor = Supervisor(
        factories,
        counters,
        settings.restart_backoff_initial_s,
        settings.restart_backoff_max_s,
        processes=ctx.processes,
    )
    metrics = None
    if settings.metrics_address:
        host, port = parse_address(settings.metrics_address)

        def health() -> tuple[bool, str]:
            states = {t.value: ("running" if t in supervisor.current and not supervisor.current[t].done()
                                else "down") for t in settings.types}
            ok = all(v == "running" for v in states.values()) and publisher.connected
            return ok, " ".join(f"{k}={v}" for k, v in states.items()) + f" nats={publisher.connected}"

        registry = metrics_registry(counters, "stackfleet_agent")
        registry.register(BudgetCollector(budget, "stackfleet_agent"))
        metrics = MetricsServer(host, port, registry, health)
        await metrics.start()
    log.info("agent on %s: profiling %s at %d Hz", settings.host_name,
             ",".join(t.value for t in settings.types), settings.frequency_hz)
    if on_supervisor is not None:
        on_supervisor(supervisor)
    try:
        await supervisor.run(stop)
    finally:
        if metrics is not None:
            await metrics.close()
        if metadata is not None:
            await metadata.close()
        await publisher.close()
        executor.shutdown(wait=True)
        log.info("agent stopped: %s", counters.snapshot())
    return counters
