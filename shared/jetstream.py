"""The JetStream stream that makes the transport durable: its settings and idempotent creation.

Every profile message (dict and samples subjects) is stored in one stream, bounded by size
and age, so an aggregator that restarts — or NATS clients that reconnect — pick up where
they left off. Resync requests stay plain core NATS: they are only meaningful now.

Who creates the stream: whichever side starts first. Agents only create it when it is
missing; aggregators additionally bring an existing stream's limits in line with their
settings (they are the consumers, so they own retention). Creation is idempotent: the
server accepts a CREATE with an identical config, and "already in use" is treated as done.
See docs/design/durability.md.
"""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from pydantic import BaseModel, Field

from shared.subjects import ALL_DICT_SUBJECTS, ALL_SAMPLE_SUBJECTS

log = logging.getLogger(__name__)

# JetStream API error code for "stream name already in use with a different configuration".
_ERR_STREAM_NAME_IN_USE = 10058


class StreamSettings(BaseModel):
    """Bounds and placement of the profile stream (``STACKFLEET_NATS__STREAM__*``)."""

    name: str = "STACKFLEET"
    # Oldest messages are discarded beyond either bound: these decide how long an aggregator
    # outage (all replicas down) can last before profiles are lost.
    max_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024 * 1024)
    max_age_s: float = Field(default=3600.0, gt=0)
    # 1 on a single server; 3 on a three-node cluster so one node can fail.
    replicas: int = Field(default=1, ge=1, le=5)
    # Publishes repeated within this window with the same Nats-Msg-Id are stored once:
    # this is what makes the agent's retry after a lost publish ack idempotent.
    duplicate_window_s: float = Field(default=120.0, gt=0)
    storage: str = Field(default="file", pattern="^(file|memory)$")

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            description="stackfleet profile messages (dictionaries and samples)",
            subjects=[ALL_DICT_SUBJECTS, ALL_SAMPLE_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_bytes=self.max_bytes,
            max_age=self.max_age_s,
            storage=StorageType.FILE if self.storage == "file" else StorageType.MEMORY,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window_s,
        )


def _limits(cfg: StreamConfig) -> tuple[object, ...]:
    return (sorted(cfg.subjects or []), cfg.max_bytes, round(cfg.max_age or 0, 3), cfg.num_replicas,
            round(cfg.duplicate_window or 0, 3))


async def ensure_stream(js: JetStreamContext, settings: StreamSettings, authoritative: bool) -> None:
    """Create the stream if it is missing; if ``authoritative``, update differing limits.

    Raises the nats-py error when JetStream itself is unavailable, so callers can retry.
    """
    wanted = settings.config()
    try:
        info = await js.stream_info(settings.name)
    except NotFoundError:
        try:
            await js.add_stream(wanted)
            log.info("created JetStream stream %s (max %d bytes, %gs, %d replica(s))", settings.name,
                     settings.max_bytes, settings.max_age_s, settings.replicas)
            return
        except BadRequestError as exc:  # created by another client between our two calls
            if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                raise
            info = await js.stream_info(settings.name)
    if _limits(info.config) == _limits(wanted):
        return
    if not authoritative:
        log.info("stream %s exists with other limits than ours; leaving it to the aggregator", settings.name)
        return
    try:
        await js.update_stream(wanted)
        log.info("updated JetStream stream %s to max %d bytes, %gs, %d replica(s)", settings.name,
                 settings.max_bytes, settings.max_age_s, settings.replicas)
    except BadRequestError as exc:  # e.g. a change the server refuses; keep running on the old one
        log.warning("could not update stream %s to our settings: %s", settings.name, exc)
