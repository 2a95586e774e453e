"""Embedded local outputs, for users without a collector: every export on disk.

Per export: ``<stamp>.otlp.pb`` (the binary ExportProfilesServiceRequest, exactly what the
collector got) and ``<stamp>.<type>.pb.gz`` per profile type (gzipped pprof, merged across
hosts). ``latest.<type>.pb.gz`` always points at the newest. Writes are atomic (temp file
+ rename) so readers never see half a file, and retention keeps the newest ``keep`` exports
so a long run cannot fill the disk.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.exporters.pprof import write_pprof
from aggregator.profile import FleetProfiles

log = logging.getLogger("stackfleet.aggregator.files")


class LocalFileWriter:
    """Writes OTLP and pprof files for each export into ``directory``."""

    def __init__(self, directory: Path, keep: int = 360) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, fleet: FleetProfiles, request: ExportProfilesServiceRequest) -> list[Path]:
        """Write one export; returns the files written. Blocking: call from a worker thread."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(fleet.end_ns / 1e9)) + f"-{fleet.end_ns % 10**9:09d}"
        written = [self._atomic(self.directory / f"{stamp}.otlp.pb", request.SerializeToString())]
        for ptype in sorted({t for _, t in fleet.hosts}):
            target = self.directory / f"{stamp}.{ptype.value}.pb.gz"
            tmp = target.with_suffix(".tmp")
            write_pprof(str(tmp), fleet, ptype)
            os.replace(tmp, target)
            written.append(target)
            latest = self.directory / f"latest.{ptype.value}.pb.gz"
            tmp_link = self.directory / f".latest.{ptype.value}.tmp"
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(target.name)
            os.replace(tmp_link, latest)
        self._enforce_retention()
        return written

    @staticmethod
    def _atomic(path: Path, data: bytes) -> Path:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def _enforce_retention(self) -> None:
        exports = sorted(self.directory.glob("*.otlp.pb"))
        for old in exports[: max(0, len(exports) - self.keep)]:
            stamp = old.name[: -len(".otlp.pb")]
            for f in self.directory.glob(f"{stamp}.*"):
                f.unlink(missing_ok=True)
