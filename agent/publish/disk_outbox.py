"""Optional disk spool for the agent's outbox: outgoing messages survive an agent restart.

Same interface and drop policy as :class:`agent.publish.memory_outbox.MemoryOutbox` (oldest dropped and
counted beyond the cap), stored in one SQLite file (stdlib ``sqlite3``: a FIFO table is
all this needs, no extra dependency). Enabled by ``spool_dir``; capped by ``spool_max_bytes``
(payload bytes) and ``max_outgoing_messages``.

Why synchronous on the event loop: in WAL mode with ``synchronous=NORMAL`` a commit appends
to the write-ahead log without fsync, tens of microseconds for the few messages a second
an agent sends — the same order as encoding them. The price is that a power loss (not a
process crash) may lose the last commits.

After a restart the spooled messages of the previous agent instance are sent first, in
order, under their original stream identity and message ids, so the aggregator decodes
them with their own (also spooled) dictionaries.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from agent.publish.memory_outbox import MemoryOutbox, Outgoing
from shared.counters import Counters

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outgoing (
    seq INTEGER PRIMARY KEY,
    profile_type TEXT NOT NULL,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    msg_id TEXT NOT NULL,
    samples INTEGER NOT NULL
)
"""


class DiskOutbox(MemoryOutbox):
    """FIFO of :class:`Outgoing` in ``<directory>/outbox.sqlite``; drops oldest beyond the caps."""

    def __init__(self, directory: Path, max_messages: int, max_bytes: int, counters: Counters,
                 log_interval_s: float = 10.0) -> None:
        super().__init__(max_messages, max_bytes, counters, log_interval_s)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "outbox.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: one statement, one commit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outgoing").fetchone()
        self._count, self._bytes = int(count), int(total)
        if self._count:
            log.info("spool %s holds %d message(s) (%d bytes) from before: sending them first",
                     self.path, self._count, self._bytes)
            counters.inc("spooled_messages_recovered", self._count)

    def __len__(self) -> int:
        return self._count

    def append(self, item: Outgoing) -> None:
        while self._count and (self._count >= self.max_messages or self._bytes + len(item.payload) > self.max_bytes):
            self.drop(self.pop(), "outgoing_queue_full")
        self._db.execute("INSERT INTO outgoing (profile_type, subject, payload, msg_id, samples) VALUES (?,?,?,?,?)",
                         (item.profile_type, item.subject, item.payload, item.msg_id, item.samples))
        self._count += 1
        self._bytes += len(item.payload)

    def pop(self) -> Outgoing:
        row = self._db.execute("SELECT seq, profile_type, subject, payload, msg_id, samples FROM outgoing "
                               "ORDER BY seq LIMIT 1").fetchone()
        if row is None:
            raise IndexError("pop from an empty spool")
        self._db.execute("DELETE FROM outgoing WHERE seq = ?", (row[0],))
        item = Outgoing(row[1], row[2], bytes(row[3]), row[4], int(row[5]))
        self._count -= 1
        self._bytes -= len(item.payload)
        return item

    def push_back(self, item: Outgoing) -> None:
        # Before the current head: one less than the smallest sequence (sequences may go negative).
        self._db.execute("INSERT INTO outgoing (seq, profile_type, subject, payload, msg_id, samples) "
                         "VALUES ((SELECT COALESCE(MIN(seq), 1) - 1 FROM outgoing), ?,?,?,?,?)",
                         (item.profile_type, item.subject, item.payload, item.msg_id, item.samples))
        self._count += 1
        self._bytes += len(item.payload)

    def shutdown(self) -> int:
        """Messages still queued stay on disk for the next start: nothing is dropped."""
        if self._count:
            log.warning("%d outgoing message(s) kept in %s for the next start", self._count, self.path)
            self.counters.inc("messages_spooled_at_shutdown", self._count)
        self._db.close()
        return 0
