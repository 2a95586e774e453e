"""Another revision's source tree beside the working tree, for before/after runs in one go.

Replay benchmarks run the same measurement on two trees in alternating subprocesses; the
measuring script itself is always the working tree's, whatever the revision had.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("agent", "shared", "tests", "benchmarks")


def export_revision(revision: str, dest: Path, runner: Path) -> Path:
    """Extract ``revision``'s source folders into ``dest``/before, with ``runner`` (a file under
    benchmarks/) replaced by the working tree's copy; returns that directory."""
    before = dest / "before"
    before.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, *SOURCE_DIRS],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    (before / "benchmarks" / runner.name).write_text(runner.read_text())
    return before
