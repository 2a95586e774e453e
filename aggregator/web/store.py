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
from aggregator.otlp.decode import merge_request
from aggregator.profile import FleetProfiles
from shared.counters import Counters
from shared.profile_types import ProfileType

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoredExport:
    """One export on disk; ``end_ns`` is the end of the interval it covers (from its name)."""

    path: Path
    end_ns: int


class RetainedExports:
    """The exports in one directory, listed by time range and parsed on demand."""

    def __init__(self, directory: Path, counters: Counters | None = None, cache_size: int = 512,
                 max_decoded_samples: int = 300_000) -> None:
        self.directory = Path(directory)
        self.counters = counters or Counters()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Path, int, int], ExportProfilesServiceRequest] = OrderedDict()
        # Exports already turned into samples of one type (the costly, pure-Python step of every
        # view), bounded by their samples' count: a page's selectors, graph and refreshes re-read
        # only new exports. See decoded().
        self.max_decoded_samples = max_decoded_samples
        self._decoded: OrderedDict[tuple[Path, int, int, ProfileType], tuple[FleetProfiles, int]] = OrderedDict()
        self._decoded_samples = 0
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

    def decoded(self, export: StoredExport, profile_type: ProfileType) -> FleetProfiles | None:
        """The export's samples of ``profile_type`` as profiles (cached; never mutate them)."""
        try:
            st = export.path.stat()
        except FileNotFoundError:
            return None
        key = (export.path, st.st_size, st.st_mtime_ns, profile_type)
        with self._lock:
            cached = self._decoded.get(key)
            if cached is not None:
                self._decoded.move_to_end(key)
                return cached[0]
        req = self.load(export)
        if req is None:
            return None
        part = FleetProfiles(0, 0)
        merge_request(part, req, profile_type)
        size = sum(len(hp.samples) for hp in part.hosts.values())
        with self._lock:
            if key not in self._decoded:
                self._decoded[key] = (part, size)
                self._decoded_samples += size
            while self._decoded and (self._decoded_samples > self.max_decoded_samples
                                     or len(self._decoded) > self.cache_size):
                _, (_, evicted) = self._decoded.popitem(last=False)
                self._decoded_samples -= evicted
        return part

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
