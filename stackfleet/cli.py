"""The ``stackfleet`` command line: agent, aggregator, and the all-in-one ``run``.

Every option can also be set with a ``STACKFLEET_*`` environment variable or in the TOML
file named by ``STACKFLEET_CONFIG``; options given here win.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from shared.allocator import configure_allocator
from stackfleet.logging_setup import setup_logging

app = typer.Typer(help="stackfleet: eBPF continuous profiler for a fleet of Linux hosts.", no_args_is_help=True,
                  add_completion=False)
console = Console(stderr=True)

NatsOpt = Annotated[str | None, typer.Option("--nats", help="NATS URL(s), comma separated [env: STACKFLEET_NATS__URL]")]
LogOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")]
WebOpt = Annotated[str | None, typer.Option(
    "--web", help="address of the web page (default 127.0.0.1:4040); '' disables [env: STACKFLEET_WEB_ADDRESS]")]
TypesOpt = Annotated[str | None, typer.Option(help="profile types, comma separated (cpu,wall,lock,heap,goroutine)")]


def _print_version(value: bool) -> None:
    if value:
        from shared.version import installed_version

        typer.echo(f"stackfleet {installed_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the installed version and exit",
                                          callback=_print_version, is_eager=True)] = False,
) -> None:
    """stackfleet: eBPF continuous profiler for a fleet of Linux hosts."""


def _overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _nats_override(url: str | None) -> dict[str, Any]:
    """Only the URL: a dict (not a NatsSettings) so pydantic-settings merges it with the other
    ``nats`` options from the environment and the TOML file (auth, TLS, stream limits)."""
    if url is None:
        return {}
    return {"nats": {"url": url}}


def _run_async(main: Any, duration: float | None) -> None:
    """Run ``main(stop)`` on uvloop until Ctrl-C/SIGTERM or ``duration`` seconds."""
    import uvloop

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if duration:
            loop.call_later(duration, stop.set)
        await main(stop)

    uvloop.run(runner())


def _types(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


@app.command()
def agent(
    nats: NatsOpt = None,
    types: TypesOpt = None,
    frequency: Annotated[int | None, typer.Option(help="sampling frequency in Hz (default 99)")] = None,
    host_name: Annotated[str | None, typer.Option(help="host name to report (default: this host's)")] = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Run the host agent: BPF actors -> symbolization -> NATS."""
    setup_logging(log_level)
    configure_allocator()
    from agent.gc_policy import apply_gc_policy
    from agent.lean_imports import skip_unused_imports

    apply_gc_policy()

    skip_unused_imports()
    from agent.main import run_agent
    from agent.settings import AgentSettings

    settings = AgentSettings(**_overrides(types=_types(types), frequency_hz=frequency, host_name=host_name),
                             **_nats_override(nats))

    async def main(stop: asyncio.Event) -> None:
        from agent.thread_names import named_worker_pool

        # Shut down with the loop (uvloop.run, like asyncio.run, closes the default executor).
        asyncio.get_running_loop().set_default_executor(named_worker_pool("agent-worker"))
        await run_agent(settings, stop)

    _run_async(main, duration)


@app.command()
def aggregator(
    nats: NatsOpt = None,
    otlp_endpoint: Annotated[str | None, typer.Option(
        help="OTLP gRPC endpoint (default $OTEL_EXPORTER_OTLP_ENDPOINT or http://localhost:4317); '' disables")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="directory for .otlp.pb and pprof files")] = None,
    export_interval: Annotated[float | None, typer.Option(help="seconds between exports (default 10)")] = None,
    web: WebOpt = None,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    log_level: LogOpt = "INFO",
) -> None:
    """Run the aggregator: NATS -> fleet-wide merge -> OTLP + local files + web page."""
    setup_logging(log_level)
    configure_allocator()
    from aggregator.service import run_aggregator
    from aggregator.settings import AggregatorSettings

    settings = AggregatorSettings(**_overrides(otlp_endpoint=otlp_endpoint, output_dir=output_dir,
                                               export_interval_s=export_interval, web_address=web),
                                  **_nats_override(nats))

    async def main(stop: asyncio.Event) -> None:
        await run_aggregator(settings, stop)

    _run_async(main, duration)


@app.command()
def run(
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds (default: until Ctrl-C)")] = None,
    output_dir: Annotated[Path, typer.Option(help="where profiles are written")] = Path("profiles"),
    nats: NatsOpt = None,
    types: TypesOpt = None,
    frequency: Annotated[int | None, typer.Option(help="sampling frequency in Hz")] = None,
    otlp_endpoint: Annotated[str | None, typer.Option(help="OTLP gRPC endpoint; '' disables")] = None,
    export_interval: Annotated[float | None, typer.Option(help="seconds between exports")] = None,
    web: WebOpt = None,
    log_level: LogOpt = "INFO",
) -> None:
    """All in one: an embedded nats-server (unless --nats), the aggregator and this host's agent."""
    setup_logging(log_level)
    configure_allocator()
    from agent.main import run_agent
    from agent.settings import AgentSettings
    from aggregator.service import run_aggregator
    from aggregator.settings import AggregatorSettings
    from stackfleet.nats_server import NatsServer

    server = None
    if nats is None:
        # JetStream's store lives with the profiles, so a re-run resumes the same stream.
        output_dir.mkdir(parents=True, exist_ok=True)
        server = NatsServer(store_dir=str(output_dir / ".nats-jetstream")).start()
        nats = server.url
        console.print(f"[bold]embedded nats-server[/] at {nats} (monitoring {server.monitor_url})")
    agg_settings = AggregatorSettings(**_overrides(otlp_endpoint=otlp_endpoint, output_dir=output_dir,
                                                   export_interval_s=export_interval, web_address=web),
                                      **_nats_override(nats))
    agent_settings = AgentSettings(**_overrides(types=_types(types), frequency_hz=frequency), **_nats_override(nats))
    console.print(f"profiles will be written to [bold]{output_dir.resolve()}[/] every "
                  f"{agg_settings.export_interval_s:g}s (OTLP to {agg_settings.otlp_endpoint or 'disabled'})")
    if agg_settings.web_address:
        console.print(f"flame graphs at [bold]http://{agg_settings.web_address}/[/]")
    started = time.monotonic()

    async def main(stop: asyncio.Event) -> None:
        # Separate stop events: the agent stops first so its last batch reaches the
        # aggregator's final export; only then does the aggregator stop.
        agent_stop, agg_stop = asyncio.Event(), asyncio.Event()
        agg = asyncio.create_task(run_aggregator(agg_settings, agg_stop))
        agt = asyncio.create_task(run_agent(agent_settings, agent_stop))
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({agg, agt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        agent_stop.set()
        agent_error = None
        try:
            await agt
        except Exception as exc:
            agent_error = exc
        await asyncio.sleep(1.0)
        agg_stop.set()
        await agg
        stop_wait.cancel()
        if agent_error is not None:
            raise agent_error

    try:
        _run_async(main, duration)
    finally:
        if server:
            server.stop()
    files = sorted(f for f in output_dir.glob("*") if f.is_file()) if output_dir.exists() else []
    console.print(f"ran {time.monotonic() - started:.0f}s; {len(files)} files in {output_dir.resolve()}")
    for f in files[-6:]:
        console.print(f"  {f}")


@app.command()
def top(
    nats: NatsOpt = None,
    profile_type: Annotated[str, typer.Option("--type", help="profile type to show")] = "cpu",
    host: Annotated[str | None, typer.Option(help="only this host (default: the whole fleet)")] = None,
    rows: Annotated[int, typer.Option(help="how many functions to list")] = 25,
    window: Annotated[float, typer.Option(help="sliding window in seconds")] = 10.0,
    duration: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
) -> None:
    """Live view of the hottest functions, straight from the NATS subjects (an ad-hoc subscriber)."""
    setup_logging("WARNING")
    from shared.nats_connection import NatsSettings
    from shared.profile_types import ProfileType
    from stackfleet.top import NatsUnreachable, run_top

    settings = NatsSettings(url=nats) if nats else _default_nats()

    async def main(stop: asyncio.Event) -> None:
        await run_top(settings, ProfileType(profile_type), host, rows, window, stop)

    try:
        _run_async(main, duration)
    except NatsUnreachable as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


@app.command()
def export(
    profile_type: Annotated[str, typer.Option("--type", help="profile type to export")] = "cpu",
    since: Annotated[str, typer.Option(help="how far back: 90s, 10m, 2h")] = "10m",
    output: Annotated[Path, typer.Option("-o", "--output", help="pprof file to write (.pb.gz)")] = Path("out.pb.gz"),
    profiles_dir: Annotated[Path, typer.Option("--dir", help="the aggregator's output directory")] = Path("profiles"),
    host: Annotated[str | None, typer.Option(help="only this host")] = None,
) -> None:
    """Merge the aggregator's stored exports of the last --since into one pprof file, for scripts."""
    from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
        ExportProfilesServiceRequest,
    )

    from aggregator.exporters.pprof import write_pprof
    from aggregator.otlp.checks import INDEX, NO_DICTIONARY, check_request
    from aggregator.otlp.decode import merge_request
    from aggregator.profile import FleetProfiles
    from shared.profile_types import ProfileType

    seconds = _duration_s(since)
    cutoff = time.time() - seconds
    files = sorted(f for f in profiles_dir.glob("*.otlp.pb") if f.stat().st_mtime >= cutoff)
    if not files:
        console.print(f"[red]no exports newer than {since} in {profiles_dir.resolve()}[/]: is the aggregator "
                      "writing there (--output-dir)?")
        raise typer.Exit(1)
    ptype = ProfileType(profile_type)
    fleet = FleetProfiles(start_ns=int(cutoff * 1e9), end_ns=time.time_ns())
    samples = 0
    for f in files:
        req = ExportProfilesServiceRequest()
        try:
            req.ParseFromString(f.read_bytes())
        except Exception as exc:  # a damaged file must not stop the export of the others
            console.print(f"[yellow]skipping unreadable {f.name}: {exc}[/]")
            continue
        broken = [v for v in check_request(req) if v.rule in (INDEX, NO_DICTIONARY)]
        if broken:  # it refers to entries it does not have: nothing of it is merged
            console.print(f"[yellow]skipping {f.name}: {broken[0]} ({len(broken)} such problems)[/]")
            continue
        samples += merge_request(fleet, req, ptype)
    if host:
        fleet.hosts = {k: v for k, v in fleet.hosts.items() if k[0] == host}
    write_pprof(str(output), fleet, ptype)
    console.print(f"wrote {output} ({ptype.value}, {len(files)} exports, {samples} samples, "
                  f"{len({h for h, _ in fleet.hosts})} hosts)")


def _duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise typer.BadParameter(f"not a duration: {text!r} (use 90s, 10m, 2h)") from None


def _default_nats() -> Any:
    from agent.settings import AgentSettings

    return AgentSettings().nats


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
