"""Embedded local outputs, for users without a collector: every export on disk.

Per export: ``<stamp>.otlp.pb`` (the binary ExportProfilesServiceRequest, exactly what the
collector got) and ``<stamp>.<type>.pb.gz`` per profile type (gzipped pprof, merged across
hosts). ``latest.<type>.pb.gz`` always points at the newest. Writes are atomic (temp file
+ rename) so readers never see half a file. Under JetStream, ``<stamp>.exported.json`` (the
stream messages the export holds, :mod:`aggregator.delivery.exported_messages`) is written last: it is
the export's commit point. An export without it, newest in a directory that has markers, was
interrupted before its messages were acked; :meth:`LocalFileWriter.recover` removes it at
start, since its messages come back by redelivery. Retention bounds the directory three ways —
at most ``keep`` exports, none older than ``max_age_s``, at most ``max_bytes`` in total —
so a long run cannot fill the disk, while the web page (:mod:`aggregator.web`) can still show
the last hours after a restart. The newest export is always kept.
"""

from __future__ import annotations

import calendar
import logging
import os
import time
from pathlib import Path

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.delivery.exported_messages import ExportMarker, read_markers
from aggregator.exporters.pprof import write_pprof
from aggregator.profile import FleetProfiles

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".exported.json"


class LocalFileWriter:
    """Writes OTLP and pprof files for each export into ``directory``."""

    def __init__(self, directory: Path, keep: int = 360, max_age_s: float | None = None,
                 max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def recover(self) -> str | None:
        """Undo what a killed predecessor left half done; returns the export removed, if any.

        Temporary files are deleted. The newest export is removed if it has no marker while
        an older one has (the directory is written under JetStream and that export's
        messages were not acked: they will be redelivered and exported again).
        """
        for tmp in self.directory.glob("*.tmp"):  # pathlib's glob includes the hidden .latest.* ones
            tmp.unlink(missing_ok=True)
        stamps = sorted({p.name.split(".", 1)[0] for p in self.directory.glob("*.otlp.pb")})
        marked = {p.name.split(".", 1)[0] for p in self.directory.glob(f"*{MARKER_SUFFIX}")}
        if not stamps or stamps[-1] in marked or not marked:
            return None
        newest = stamps[-1]
        for f in self.directory.glob(f"{newest}.*"):
            f.unlink(missing_ok=True)
        for link in self.directory.glob("latest.*.pb.gz"):
            if link.is_symlink() and not link.exists():
                link.unlink()
        log.warning("removed export %s: its writer was stopped before committing it; its messages are "
                    "redelivered and exported again", newest)
        return newest

    def markers(self) -> list[ExportMarker]:
        """The markers of the exports on disk, oldest first."""
        return read_markers(self.directory.glob(f"*{MARKER_SUFFIX}"))

    def write(self, fleet: FleetProfiles, request: ExportProfilesServiceRequest,
              marker: ExportMarker | None = None) -> list[Path]:
        """Write one export, its marker last; returns the files written. Blocking: call from a worker thread."""
        stamp = export_stamp(fleet.end_ns)
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
        if marker is not None:
            written.append(self._atomic(self.directory / f"{stamp}{MARKER_SUFFIX}", marker.to_json()))
        self._enforce_retention()
        return written

    @staticmethod
    def _atomic(path: Path, data: bytes) -> Path:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def _enforce_retention(self, now: float | None = None) -> list[str]:
        """Delete whole exports (all files of a stamp), oldest first, until every bound holds.

        Age is measured from the file's modification time (when it was written), so files
        copied in from elsewhere are not deleted at once. Returns the stamps deleted.
        """
        now = time.time() if now is None else now
        # One directory listing per write (thousands of files at the default bounds): group the
        # files of each export by their stamp, the part of the name before the first dot.
        by_stamp: dict[str, list[Path]] = {}
        sizes: dict[str, int] = {}
        written: dict[str, float] = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.is_symlink() or not entry.is_file():
                    continue
                stamp = entry.name.split(".", 1)[0]
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted under us
                    continue
                by_stamp.setdefault(stamp, []).append(Path(entry.path))
                sizes[stamp] = sizes.get(stamp, 0) + st.st_size
                if entry.name.endswith(".otlp.pb"):
                    written[stamp] = st.st_mtime
        # (stamp, files, bytes, written_at), oldest first; only stamps that have their OTLP file
        exports = [(stamp, by_stamp[stamp], sizes[stamp], written[stamp]) for stamp in sorted(written)]
        total = sum(e[2] for e in exports)
        deleted: list[str] = []
        for stamp, files, size, written_at in exports[:-1]:  # the newest export always stays
            too_many = len(exports) - len(deleted) > self.keep
            too_old = self.max_age_s is not None and now - written_at > self.max_age_s
            too_big = self.max_bytes is not None and total > self.max_bytes
            if not (too_many or too_old or too_big):
                break
            for f in files:
                f.unlink(missing_ok=True)
            total -= size
            deleted.append(stamp)
        if deleted:
            log.debug("retention removed %d exports (oldest %s)", len(deleted), deleted[0])
        return deleted


def export_stamp(end_ns: int) -> str:
    """File-name stamp of an export: its end time in UTC, sortable, to the nanosecond."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(end_ns // 10**9)) + f"-{end_ns % 10**9:09d}"


def stamp_ns(stamp: str) -> int | None:
    """Inverse of :func:`export_stamp`; None for a name that is not a stamp."""
    try:
        seconds, nanos = stamp.split("-", 1)
        return calendar.timegm(time.strptime(seconds, "%Y%m%dT%H%M%S")) * 10**9 + int(nanos)
    except ValueError:
        return None
