"""Reading the retained exports back: the ``*.otlp.pb`` files that the files exporter writes.

The web page shows what is on disk, not what is in memory, so it survives an aggregator
restart and shows exactly what the collector was sent. Parsed requests are cached by
(path, size, mtime) — a page that refreshes every few seconds re-reads only the new
exports. Everything here blocks (file reads, protobuf parsing): call it from a thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.exporters.files import stamp_ns
from shared.counters import Counters

log = logging.getLogger("stackfleet.aggregator.web")


@dataclass(frozen=True, slots=True)
class StoredExport:
    """One export on disk; ``end_ns`` is the end of the interval it covers (from its name)."""

    path: Path
    end_ns: int


class RetainedExports:
    """The exports in one directory, listed by time range and parsed on demand."""

    def __init__(self, directory: Path, counters: Counters | None = None, cache_size: int = 512) -> None:
        self.directory = Path(directory)
        self.counters = counters or Counters()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Path, int, int], ExportProfilesServiceRequest] = OrderedDict()
        self._bad: set[tuple[Path, int, int]] = set()  # damaged files: counted and logged once
        self._lock = threading.Lock()  # handlers run in several worker threads

    def list(self, since_ns: int, until_ns: int) -> list[StoredExport]:
        """Exports whose interval ends within [since_ns, until_ns], oldest first."""
        out = []
        for path in self.directory.glob("*.otlp.pb"):
            end = stamp_ns(path.name[: -len(".otlp.pb")])
            if end is not None and since_ns <= end <= until_ns:
                out.append(StoredExport(path, end))
        return sorted(out, key=lambda e: e.end_ns)

    def load(self, export: StoredExport) -> ExportProfilesServiceRequest | None:
        """The parsed request, or None (counted and logged) if the file is gone or damaged."""
        try:
            st = export.path.stat()
        except FileNotFoundError:  # retention removed it since list()
            return None
        key = (export.path, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            if key in self._bad:
                return None
        req = ExportProfilesServiceRequest()
        try:
            req.ParseFromString(export.path.read_bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged file must not break the page for the others
            self.counters.inc("web_unreadable_exports")
            log.warning("skipping unreadable export %s: %s", export.path.name, exc)
            with self._lock:
                if len(self._bad) > 10 * self.cache_size:
                    self._bad.clear()
                self._bad.add(key)
            return None
        with self._lock:
            self._cache[key] = req
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return req
