"""Fixtures shared by the fast tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

GOROUTINES = Path(__file__).resolve().parents[1] / "integration" / "workloads" / "goroutines"


@pytest.fixture(scope="session")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The goroutine workload built twice: plain, and stripped (``-ldflags=-s -w``)."""
    out = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(out / "cache"), "GOFLAGS": ""}
    plain, stripped = out / "plain", out / "stripped"
    subprocess.run(["go", "build", "-o", str(plain), "main.go"], cwd=GOROUTINES, env=env, check=True)
    subprocess.run(["go", "build", "-ldflags=-s -w", "-o", str(stripped), "main.go"], cwd=GOROUTINES, env=env,
                   check=True)
    return plain, stripped
