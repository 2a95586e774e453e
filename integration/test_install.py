"""The operator's install path, end to end: wheel -> stackfleet-install -> running -> uninstall.

The wheel is built from the checkout's files (tracked and new, not ignored ones); the
installer (on Debian's python3: scripts/stackfleet-install for the agent, the wheel alone as
``python3 -m stackfleet.install`` for the aggregator) puts the agent and the aggregator
into a temporary prefix with their units and configuration in temporary directories. systemd
is not PID 1 here, so the units are checked with ``systemd-analyze verify`` against that
prefix and the installed executables are run directly, with the environment and config file
their units give them, against a real nats-server: the aggregator must export CPU samples
that the installed agent took on this host. Uninstall must leave the file tree as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from stackfleet.nats_server import NatsServer

ROOT = Path(__file__).resolve().parents[1]
INSTALLER = ROOT / "scripts" / "stackfleet-install"
WAIT_S = 180  # BPF compiles take tens of seconds on a loaded machine


def build_wheel(out: Path) -> Path:
    """A wheel of the checkout's own files: copied first, so no stale build/ output gets in."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    src = out / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(src)],
                   check=True, capture_output=True)
    shutil.rmtree(src)
    return next(out.glob("stackfleet-*.whl"))


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def system_paths() -> dict[str, bool | list[str]]:
    """What a mistaken install into the real system paths would change."""
    return {"/opt/stackfleet": Path("/opt/stackfleet").exists(), "/etc/stackfleet": Path("/etc/stackfleet").exists(),
            "units": sorted(p.name for p in Path("/etc/systemd/system").glob("stackfleet*"))}


def unit_environment(env_file: Path, unit_file: Path) -> dict[str, str]:
    """The environment the unit gives its process: EnvironmentFile= plus Environment=."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STACKFLEET_", "PYTHON"))}
    for line in env_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    for line in unit_file.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


def exec_start(unit_file: Path) -> list[str]:
    line = next(x for x in unit_file.read_text().splitlines() if x.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def exported_samples(directory: Path) -> int:
    total = 0
    for path in directory.glob("*.otlp.pb"):
        req = ExportProfilesServiceRequest()
        req.ParseFromString(path.read_bytes())
        total += sum(len(p.samples) for rp in req.resource_profiles for sp in rp.scope_profiles for p in sp.profiles)
    return total


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (what systemd sends), then SIGKILL after a minute; never raises."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clean_exit(proc: subprocess.Popen[bytes], log: Path) -> str:
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def test_install_run_uninstall(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package provides it)")
    wheel = build_wheel(tmp_path / "wheel")
    root = tmp_path / "root"  # stands for / of the VM
    root.mkdir()
    layout = ["--prefix", str(root / "opt/stackfleet"), "--config-dir", str(root / "etc/stackfleet"),
              "--unit-dir", str(root / "etc/systemd/system")]
    before, system_before = tree(root), system_paths()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    venv_bin = root / "opt/stackfleet/.venv/bin"
    units = root / "etc/systemd/system"

    with NatsServer() as nats:
        # The agent from the checkout's installer script, the aggregator with the wheel alone
        # (the installer module runs from inside the wheel and installs that wheel).
        from_checkout = [str(INSTALLER), "agent", "--wheel", str(wheel)]
        from_wheel = ["/usr/bin/python3", "-m", "stackfleet.install", "aggregator"]
        wheel_env = {**os.environ, "PYTHONPATH": str(wheel)}
        for command, env in ((from_checkout, None), (from_wheel, wheel_env)):
            out = subprocess.run([*command, "--nats", nats.url, "--no-start", *layout], capture_output=True, text=True,
                                 timeout=600, env=env, cwd=tmp_path)
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"installed stackfleet {version}" in out.stdout, out.stdout
        assert subprocess.run([str(venv_bin / "stackfleet"), "--version"], capture_output=True, text=True,
                              check=True).stdout.strip() == f"stackfleet {version}"
        unit_files = sorted(units.glob("*.service"))
        assert [u.name for u in unit_files] == ["stackfleet-agent.service", "stackfleet-aggregator.service"]
        verify = subprocess.run(["systemd-analyze", "verify", *map(str, unit_files)], capture_output=True, text=True,
                                env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
        for unit in unit_files:
            assert exec_start(unit)[0] == str(venv_bin / "stackfleet"), unit.read_text()
            text = unit.read_text()
            for path in ("/opt/stackfleet", "/etc/stackfleet"):  # every one rendered into the prefix
                assert text.count(path) == text.count(f"{root}{path}") > 0, text

        # Run what the units would run, as they would (their environment), for a few seconds.
        agent_unit, agg_unit = units / "stackfleet-agent.service", units / "stackfleet-aggregator.service"
        exports = tmp_path / "exports"
        agg_cmd = [*exec_start(agg_unit)[:2], "--output-dir", str(exports), "--otlp-endpoint", "",
                   "--export-interval", "1", "--web", ""]  # the unit's output dir is systemd's StateDirectory
        agg_env = unit_environment(root / "etc/stackfleet/aggregator.env", agg_unit)
        agent_env = {**unit_environment(root / "etc/stackfleet/agent.env", agent_unit), "STACKFLEET_TYPES": "cpu"}
        assert agent_env["STACKFLEET_NATS__URL"] == nats.url
        agg_log, agent_log = tmp_path / "aggregator.log", tmp_path / "agent.log"
        with agg_log.open("wb") as agg_out, agent_log.open("wb") as agent_out:
            agg = subprocess.Popen(agg_cmd, env=agg_env, stdout=agg_out, stderr=subprocess.STDOUT)
            agent = subprocess.Popen(exec_start(agent_unit), env=agent_env, stdout=agent_out, stderr=subprocess.STDOUT)
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # something to sample
            try:
                deadline = time.monotonic() + WAIT_S
                while not (exports.exists() and exported_samples(exports)):
                    assert agent.poll() is None, agent_log.read_text()[-3000:]
                    assert agg.poll() is None, agg_log.read_text()[-3000:]
                    assert time.monotonic() < deadline, "no samples exported:\n" + agent_log.read_text()[-3000:]
                    time.sleep(1)
            finally:  # every process stops before anything is asserted
                busy.kill()
                busy.wait()
                stop(agent)
                stop(agg)
        assert "agent stopped" in clean_exit(agent, agent_log)
        clean_exit(agg, agg_log)
        print(f"installed agent's samples exported: {exported_samples(exports)}")

    for component in ("agent", "aggregator"):
        # --keep-data: the aggregator's state directory is systemd's, on the real system (never made here).
        out = subprocess.run([str(INSTALLER), "--uninstall", component, "--keep-data", *layout], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    assert tree(root) == before
    assert system_paths() == system_before
