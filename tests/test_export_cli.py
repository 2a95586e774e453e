"""`stackfleet export`: stored OTLP exports merged into one pprof that Google pprof reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.exporters.files import LocalFileWriter
from aggregator.otlp import encode_request
from aggregator.otlp_decode import merge_request
from aggregator.profile import FleetProfiles
from shared.profile_types import ProfileType
from tests.test_otlp import fleet

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"
STACKFLEET = str(Path(sys.executable).parent / "stackfleet")


def test_decode_is_the_inverse_of_encode() -> None:
    original = fleet()
    decoded = FleetProfiles(0, 0)
    merge_request(decoded, encode_request(original, "svc", "1"), ProfileType.LOCK)
    (lock,) = decoded.hosts.values()
    (sample,) = lock.samples.values()
    assert sample.values == [3, 1_500] and sample.frames[0].function == "wait"
    merge_request(decoded, encode_request(original, "svc", "1"), ProfileType.CPU)
    cpu = decoded.hosts[("web-1", ProfileType.CPU)]
    assert sum(s.values[0] for s in cpu.samples.values()) == 3 * 10_101_010


def test_export_command_merges_files_into_pprof(tmp_path: Path) -> None:
    writer = LocalFileWriter(tmp_path / "profiles")
    f = fleet()
    for i in range(3):
        f.end_ns = 10_000_000_000 + i
        writer.write(f, encode_request(f, "svc", "1"))
    out = tmp_path / "out.pb.gz"
    result = subprocess.run([STACKFLEET, "export", "--type", "cpu", "--since", "10m", "-o", str(out),
                             "--dir", str(tmp_path / "profiles")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 exports" in result.stderr + result.stdout
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    top = subprocess.run([str(PPROF), "-top", "-unit=ns", str(out)], capture_output=True, text=True, check=True).stdout
    assert "leaf" in top
    # 3 exports x 2 hosts x 3 samples of 10,101,010 ns
    assert "181818180ns" in top.replace(",", "") or "0.18s" in top, top


def test_export_without_files_says_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run([STACKFLEET, "export", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "no exports" in result.stderr + result.stdout
