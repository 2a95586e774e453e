"""Fixtures shared by the fast tests: Go workloads built once per session per toolchain."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from integration.go_toolchains import BUILD_FLAGS, GoToolchain, available, system

WORKLOADS = Path(__file__).resolve().parents[1] / "integration" / "workloads"
GOROUTINES = WORKLOADS / "goroutines"
TOOLCHAINS = available()
VARIANTS = tuple(BUILD_FLAGS)  # plain, stripped, pie
# Compiled packages are kept between sessions (Go's cache is safe to share): building the
# standard library for 6 toolchains x 3 variants costs minutes, a warm build seconds.
GO_CACHE = Path(tempfile.gettempdir()) / "stackfleet-gocache"


class GoBuilds:
    """Workload binaries, each built once per session by (workload, toolchain, variant)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._built: dict[tuple[str, str, str], Path] = {}

    def get(self, workload: str | Path, toolchain: GoToolchain, variant: str = "plain") -> Path:
        """``workload``: a folder name under integration/workloads, or a source folder;
        ``variant``: one of VARIANTS, or "trimpath" (plain with ``-trimpath``)."""
        source = WORKLOADS / workload if isinstance(workload, str) else workload
        key = (str(source), toolchain.version, variant)
        if key not in self._built:
            exe = self.out / f"{source.name}-{toolchain.version}-{variant}"
            base, extra = ("plain", ("-trimpath",)) if variant == "trimpath" else (variant, ())
            self._built[key] = toolchain.build(source, exe, base, cache=GO_CACHE / toolchain.version, extra=extra)
        return self._built[key]


@pytest.fixture(scope="session")
def go_builds(tmp_path_factory: pytest.TempPathFactory) -> GoBuilds:
    return GoBuilds(tmp_path_factory.mktemp("go_builds"))


@pytest.fixture(scope="session")
def binaries(go_builds: GoBuilds) -> tuple[Path, Path]:
    """The goroutine workload of the system ``go`` (Debian's 1.19), plain and stripped."""
    go = system()
    return go_builds.get("goroutines", go, "plain"), go_builds.get("goroutines", go, "stripped")
