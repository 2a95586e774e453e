"""The machine facts benchmarks record (benchmarks/machine.py), on known text."""

from __future__ import annotations

from pathlib import Path

from benchmarks.machine import cpu_identity, mitigations

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 1

processor\t: 1
cpu family\t: 99
model\t\t: 1
model name\t: other
"""


def test_the_first_processors_identity_is_read() -> None:
    assert cpu_identity(CPUINFO) == {"family": "25", "model": "17", "model_name": "AMD EPYC 9B14", "stepping": "1"}


def test_mitigations_are_read_and_missing_ones_left_out(tmp_path: Path) -> None:
    (tmp_path / "spec_rstack_overflow").write_text("Vulnerable: Safe RET, no microcode\n")
    (tmp_path / "meltdown").write_text("Not affected\n")
    assert mitigations(tmp_path) == {"spec_rstack_overflow": "Vulnerable: Safe RET, no microcode",
                                     "meltdown": "Not affected"}
