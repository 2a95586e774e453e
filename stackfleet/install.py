"""Install or uninstall the stackfleet agent or aggregator on one machine (a VM, as an operator would).

Run with Debian's ``/usr/bin/python3`` (the interpreter that has bcc), before any venv exists,
so this module uses the standard library only. From a checkout: ``scripts/stackfleet-install``;
from a wheel alone: ``sudo env PYTHONPATH=stackfleet-X-py3-none-any.whl python3 -m stackfleet.install``
(the wheel then installs itself).

Install: checks the machine (for the agent: root, bcc, the BPF syscall, tracefs, kernel
headers for bcc, BTF; each failure says what to do), creates ``PREFIX/.venv`` on
``/usr/bin/python3`` with ``--system-site-packages`` (so Debian's bcc imports), installs the
wheel into it, writes ``CONFIG_DIR/<component>.env`` (the NATS URL) and the systemd unit
rendered for the prefix and config directory, then enables and starts the unit when systemd
runs. Every file and directory it creates is listed in ``PREFIX/stackfleet-<component>.install.json``;
uninstall stops the unit and removes exactly those, the venv once no component is left, and
the aggregator's state directory (retained exports) unless ``--keep-data``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPONENTS = ("agent", "aggregator")
DEFAULT_PREFIX = Path("/opt/stackfleet")
DEFAULT_CONFIG_DIR = Path("/etc/stackfleet")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_PYTHON = Path("/usr/bin/python3")
STATE_DIRS = (Path("/var/lib/stackfleet"), Path("/var/lib/private/stackfleet"))  # the unit's StateDirectory
# The paths the unit files in deploy/systemd are written for; install replaces them.
UNIT_PREFIX, UNIT_CONFIG_DIR = "/opt/stackfleet", "/etc/stackfleet"
UNITS_IN_VENV = Path("share/stackfleet/systemd")  # where the wheel's data files put the units
CHECKOUT = Path(__file__).resolve().parents[1]
CONFIG_FILE_TEXT = ("# stackfleet configuration ([agent] and [aggregator] tables); see the README.\n"
                    "# Written empty by the installer: the NATS URL is in the component's .env file.\n")


class InstallError(Exception):
    """A step that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Layout:
    """Where one installation puts things."""

    prefix: Path = DEFAULT_PREFIX
    config_dir: Path = DEFAULT_CONFIG_DIR
    unit_dir: Path = DEFAULT_UNIT_DIR

    @property
    def venv(self) -> Path:
        return self.prefix / ".venv"

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "stackfleet"

    def unit(self, component: str) -> Path:
        return self.unit_dir / unit_name(component)

    def manifest(self, component: str) -> Path:
        return self.prefix / f"stackfleet-{component}.install.json"


def unit_name(component: str) -> str:
    return f"stackfleet-{component}.service"


# ---- machine checks ------------------------------------------------------------------------

def _bpf_syscall_error() -> str | None:
    """None when the bpf() syscall creates a map here, else why not (errno as text)."""
    # BPF_MAP_CREATE of a one-entry array: the smallest thing that proves the syscall works
    # for this user; ctypes because no standard-library call reaches bpf().
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # map_type=ARRAY, key_size, value_size, max_entries
    nr_bpf = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
    if nr_bpf is None:
        return f"unknown bpf() syscall number on {platform.machine()}"
    fd = libc.syscall(nr_bpf, 0, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return os.strerror(ctypes.get_errno())
    os.close(fd)
    return None


def agent_problems(root: Path = Path("/"), python: Path = DEFAULT_PYTHON,
                   bpf_error: Callable[[], str | None] = _bpf_syscall_error) -> list[str]:
    """What stops the agent from running on this machine, one actionable sentence each.

    ``root`` is the file system to look at (tests pass a fake tree).
    """
    problems = []
    release = platform.release()
    if os.geteuid() != 0:
        problems.append("run as root: the agent loads BPF programs and the installer writes systemd units")
    error = bpf_error()
    if error is not None:
        problems.append(f"the bpf() syscall fails ({error}): the kernel needs CONFIG_BPF_SYSCALL and this "
                        "user CAP_BPF (or root)")
    if not any((root / p / "events").is_dir() for p in ("sys/kernel/tracing", "sys/kernel/debug/tracing")):
        problems.append("tracefs is not mounted (no /sys/kernel/tracing/events): mount -t tracefs nodev "
                        "/sys/kernel/tracing (and add it to /etc/fstab)")
    if not (root / "lib/modules" / release / "build" / "include").is_dir():
        problems.append(f"no kernel headers for bcc at /lib/modules/{release}/build: apt-get install "
                        f"linux-headers-{release} (or link the closest headers' directory there)")
    if not (root / "sys/kernel/btf/vmlinux").is_file():
        problems.append("the kernel has no BTF (/sys/kernel/btf/vmlinux): the BPF programs need "
                        "CONFIG_DEBUG_INFO_BTF=y")
    problems += _python_problems(python, need_bcc=True)
    return problems


def aggregator_problems(python: Path = DEFAULT_PYTHON) -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root: the installer writes systemd units")
    return problems + _python_problems(python, need_bcc=False)


def _python_problems(python: Path, need_bcc: bool) -> list[str]:
    if not os.access(python, os.X_OK):
        return [f"{python} is missing: apt-get install python3 python3-venv"]
    modules = "venv, ensurepip" + (", bcc" if need_bcc else "")
    probe = subprocess.run([str(python), "-c", f"import sys; import {modules}; print(sys.version_info >= (3, 11))"],
                           capture_output=True, text=True, env=_child_env())
    if probe.returncode != 0:
        missing = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "import failed"
        hint = "apt-get install python3-venv" + (" python3-bpfcc" if need_bcc else "")
        return [f"{python} cannot import {modules} ({missing}): {hint}"]
    if probe.stdout.strip() != "True":
        return [f"{python} is older than 3.11, which stackfleet needs"]
    return []


# ---- install -------------------------------------------------------------------------------

class Manifest:
    """The files and directories one install created, in creation order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created: list[str] = []
        self.config_file_text: str | None = None

    def mkdir(self, directory: Path) -> None:
        missing = []
        for d in (directory, *directory.parents):
            if d.exists():
                break
            missing.append(d)
        for d in reversed(missing):
            d.mkdir()
            self.created.append(str(d) + "/")

    def write(self, path: Path, text: str, mode: int = 0o644) -> None:
        self.mkdir(path.parent)
        if not path.exists():
            self.created.append(str(path))
        # Created with its mode (an env file may hold credentials), then the mode of an existing one.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
            f.write(text)
        path.chmod(mode)

    def save(self) -> None:
        self.path.write_text(json.dumps({"created": self.created, "config_file_text": self.config_file_text},
                                        indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text())
        manifest = cls(path)
        manifest.created = list(data["created"])
        manifest.config_file_text = data.get("config_file_text")
        return manifest


def _child_env() -> dict[str, str]:
    """This environment without the Python path the wrapper set (the checkout must not shadow the venv)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(cmd: list[str], what: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if result.returncode != 0:
        raise InstallError(f"{what} failed ({' '.join(cmd)}):\n{(result.stdout + result.stderr).strip()[-3000:]}")
    return result.stdout


def _wheel_to_install(wheel: Path | None, venv: Path, workdir: Path) -> Path:
    """The given wheel, else the wheel this module runs from, else one built from the checkout."""
    if wheel is not None:
        if not wheel.is_file():
            raise InstallError(f"no wheel at {wheel}")
        return wheel
    for entry in sys.path:
        if entry.endswith(".whl") and Path(entry).is_file() and Path(__file__).is_relative_to(Path(entry)):
            return Path(entry)
    if not (CHECKOUT / "pyproject.toml").is_file():
        raise InstallError("give --wheel FILE (no checkout next to this installer to build one from)")
    print(f"building the wheel from {CHECKOUT}")
    _run([str(venv / "bin" / "pip"), "wheel", "--no-deps", "--quiet", "--wheel-dir", str(workdir), str(CHECKOUT)],
         "building the wheel")
    built = sorted(workdir.glob("stackfleet-*.whl"))
    if not built:
        raise InstallError(f"pip built no stackfleet wheel in {workdir}")
    return built[-1]


def render_unit(template: str, layout: Layout) -> str:
    """The unit file with the prefix and configuration directory of this installation."""
    return template.replace(UNIT_PREFIX + "/", str(layout.prefix) + "/").replace(
        UNIT_CONFIG_DIR + "/", str(layout.config_dir) + "/")


def _unit_template(layout: Layout, component: str) -> str:
    installed = layout.venv / UNITS_IN_VENV / unit_name(component)
    if not installed.is_file():
        raise InstallError(f"the wheel did not install {installed}: is it a stackfleet wheel?")
    return installed.read_text()


def _env_file_text(component: str, nats_url: str) -> str:
    return (f"# Environment of {unit_name(component)} (written by stackfleet-install; STACKFLEET_* settings,\n"
            f"# see the README). Credentials may go here: the file is readable by root only.\n"
            f"STACKFLEET_NATS__URL={nats_url}\n")


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def install(component: str, nats_url: str, layout: Layout, wheel: Path | None = None,
            python: Path = DEFAULT_PYTHON, pip_args: tuple[str, ...] = (), start: bool = True,
            check: bool = True) -> None:
    if check:
        problems = agent_problems(python=python) if component == "agent" else aggregator_problems(python)
        if problems:
            raise InstallError("this machine is not ready:\n" + "\n".join(f"  - {p}" for p in problems))
    manifest_path = layout.manifest(component)
    manifest = Manifest.load(manifest_path) if manifest_path.exists() else Manifest(manifest_path)
    manifest.mkdir(layout.prefix)
    manifest.save()  # from here on, --uninstall can clean up even if a later step fails
    if not (layout.venv / "bin" / "python").exists():
        print(f"creating {layout.venv} on {python} (with the system's site-packages, for bcc)")
        _run([str(python), "-m", "venv", "--system-site-packages", str(layout.venv)], "creating the venv")
    with tempfile.TemporaryDirectory(prefix="stackfleet-wheel-") as workdir:
        wheel_file = _wheel_to_install(wheel, layout.venv, Path(workdir))
        print(f"installing {wheel_file.name} into {layout.venv}")
        pip = str(layout.venv / "bin" / "pip")
        _run([pip, "install", "--quiet", *pip_args, str(wheel_file)], "installing the wheel and its dependencies")
        # Again without dependencies: a rebuilt wheel of the same version replaces the installed one.
        _run([pip, "install", "--quiet", "--force-reinstall", "--no-deps", *pip_args, str(wheel_file)],
             "installing the wheel")
    version = _run([str(layout.executable), "--version"], "running the installed stackfleet").strip()
    if component == "agent":
        _run([str(layout.venv / "bin" / "python"), "-c", "import bcc"], "importing bcc in the venv")
    manifest.write(layout.config_dir / f"{component}.env", _env_file_text(component, nats_url), mode=0o600)
    config_file = layout.config_dir / "stackfleet.toml"
    if not config_file.exists():  # the unit names it in STACKFLEET_CONFIG, so it must exist
        manifest.write(config_file, CONFIG_FILE_TEXT)
        manifest.config_file_text = CONFIG_FILE_TEXT
    manifest.write(layout.unit(component), render_unit(_unit_template(layout, component), layout))
    manifest.save()
    print(f"installed {version}: {layout.unit(component)}, {layout.config_dir / (component + '.env')}")
    if start:
        _start(component, layout)


def _start(component: str, layout: Layout) -> None:
    unit = unit_name(component)
    if not systemd_running():
        print(f"systemd is not running here: start it by hand with "
              f"'set -a; . {layout.config_dir}/{component}.env; {layout.executable} {component}'")
        return
    _run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
    _run(["systemctl", "enable", "--now", unit], f"starting {unit}")
    time.sleep(3)  # a unit that fails at once (bad NATS URL, BPF refused) is seen as failed by then
    state = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
    if state != "active":
        raise InstallError(f"{unit} is {state}: see journalctl -u {unit}")
    print(f"{unit} is running; logs: journalctl -u {unit}")


# ---- uninstall -----------------------------------------------------------------------------

def uninstall(component: str, layout: Layout, keep_data: bool = False) -> None:
    manifest_path = layout.manifest(component)
    if not manifest_path.exists():
        raise InstallError(f"{component} is not installed under {layout.prefix} (no {manifest_path.name})")
    manifest = Manifest.load(manifest_path)
    unit = layout.unit(component)
    if systemd_running() and unit.exists():
        subprocess.run(["systemctl", "disable", "--now", unit.name], capture_output=True, text=True)
    others = [c for c in COMPONENTS if c != component and layout.manifest(c).exists()]
    config_file = layout.config_dir / "stackfleet.toml"
    shared = [e for e in manifest.created if e.endswith("/") or Path(e) == config_file]
    if others:  # directories and the config file serve the other component too: it owns them now
        heir = Manifest.load(layout.manifest(others[0]))
        heir.created = shared + [e for e in heir.created if e not in shared]
        if config_file.as_posix() in shared:
            heir.config_file_text = manifest.config_file_text
        heir.save()
    for entry in reversed(manifest.created):
        if entry in shared:
            continue
        Path(entry).unlink(missing_ok=True)
    manifest_path.unlink()
    if not others:
        if config_file.as_posix() in shared and not _changed(config_file, manifest.config_file_text):
            config_file.unlink(missing_ok=True)  # an operator's edits stay
        shutil.rmtree(layout.venv, ignore_errors=True)
        for entry in reversed(shared):
            if entry.endswith("/"):
                _remove_if_empty(Path(entry.rstrip("/")))
    if systemd_running():
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
    if component == "aggregator" and not keep_data:
        for state in STATE_DIRS:
            shutil.rmtree(state, ignore_errors=True)
    print(f"uninstalled the {component} from {layout.prefix}")


def _changed(path: Path, written: str | None) -> bool:
    try:
        return written is None or path.read_text() != written
    except FileNotFoundError:
        return False


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty (someone else's files) or already gone
        pass


# ---- command line --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stackfleet-install",
        description="Install (or with --uninstall remove) the stackfleet agent or aggregator on this machine.",
        epilog="examples:\n  stackfleet-install agent --nats nats://nats.internal:4222\n"
               "  stackfleet-install aggregator --nats nats://nats.internal:4222 --wheel stackfleet-0.1.0-*.whl\n"
               "  stackfleet-install --uninstall agent",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument("--uninstall", action="store_true", help="remove what the install created")
    parser.add_argument("--nats", help="NATS URL(s), comma separated (required to install)")
    parser.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, help="install directory (default %(default)s)")
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR, help="default %(default)s")
    parser.add_argument("--unit-dir", type=Path, default=DEFAULT_UNIT_DIR, help="default %(default)s")
    parser.add_argument("--wheel", type=Path, help="the stackfleet wheel (default: build it from this checkout)")
    parser.add_argument("--python", type=Path, default=DEFAULT_PYTHON,
                        help="interpreter for the venv, the one with Debian's bcc (default %(default)s)")
    parser.add_argument("--pip-arg", action="append", default=[],
                        help="extra argument for pip install, repeatable (e.g. --pip-arg=--no-index)")
    parser.add_argument("--no-start", action="store_true", help="install only; do not enable or start the unit")
    parser.add_argument("--skip-checks", action="store_true", help="do not check the kernel and interpreter")
    parser.add_argument("--keep-data", action="store_true", help="uninstall: keep the aggregator's retained exports")
    args = parser.parse_args(argv)
    layout = Layout(args.prefix.absolute(), args.config_dir.absolute(), args.unit_dir.absolute())
    try:
        if args.uninstall:
            uninstall(args.component, layout, keep_data=args.keep_data)
        else:
            if not args.nats:
                parser.error("--nats URL is required to install")
            install(args.component, args.nats, layout, wheel=args.wheel, python=args.python,
                    pip_args=tuple(args.pip_arg), start=not args.no_start, check=not args.skip_checks)
    except InstallError as exc:
        print(f"stackfleet-install: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
