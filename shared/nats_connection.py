"""NATS connection settings and connect(), shared by agent, aggregator and ad-hoc tools.

Authentication (user/password, token, nkey seed, creds file) and TLS are plain settings so
every component is configured the same way (``STACKFLEET_NATS_*`` variables).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import SlowConsumerError
from pydantic import BaseModel, Field

from shared.counters import Counters
from shared.jetstream import StreamSettings
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ERROR_LOG_INTERVAL_S = 30.0


class NatsSettings(BaseModel):
    """How to reach and authenticate to NATS."""

    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkeys_seed: str | None = None
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout_s: float = 5.0
    # Bytes nats-py may buffer while disconnected before publish() raises; bounded on purpose.
    pending_bytes: int = 8 * 1024 * 1024
    # Durable transport through a JetStream stream (docs/design/durability.md). Off = plain
    # core NATS as before (fire and forget; a restarting aggregator misses what is sent meanwhile).
    jetstream: bool = True
    stream: StreamSettings = Field(default_factory=StreamSettings)
    # How long a JetStream request (publish ack, stream/consumer API) may take.
    jetstream_timeout_s: float = Field(default=5.0, gt=0)


def _tls_context(s: NatsSettings) -> ssl.SSLContext | None:
    if not (s.tls_ca or s.tls_cert or s.url.startswith("tls://")):
        return None
    ctx = ssl.create_default_context(cafile=s.tls_ca)
    if s.tls_cert:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
    return ctx


async def connect(s: NatsSettings, name: str, counters: Counters | None = None, **callbacks: Any) -> NATS:
    """Connect with infinite reconnects; errors and state changes are logged and counted.

    A slow consumer (our subscription's pending buffer full) makes the client drop messages:
    that is counted as ``messages_dropped{reason=slow_consumer}``, never silent.
    """

    last_logged: dict[str, float] = {}
    suppressed: dict[str, int] = {}

    async def error_cb(exc: Exception) -> None:
        kind = type(exc).__name__
        if counters is not None:
            if isinstance(exc, SlowConsumerError):
                counters.inc("messages_dropped", reason="slow_consumer", subject=str(exc.subject))
            else:
                counters.inc("nats_errors", error=kind)
        # While a server is away nats-py reports every (re)connect attempt: once per 30 s is enough.
        now = time.monotonic()
        if now - last_logged.get(kind, -1e9) < ERROR_LOG_INTERVAL_S:
            suppressed[kind] = suppressed.get(kind, 0) + 1
            return
        last_logged[kind] = now
        again = f" ({suppressed.pop(kind)} more like it since the last report)" if suppressed.get(kind) else ""
        log.warning("%s: NATS error: %s%s. Check that nats-server runs at %s and the credentials and TLS "
                    "settings match it", name, exc or kind, again, s.url)

    async def disconnected_cb() -> None:
        log.warning("%s: disconnected from NATS", name)

    async def reconnected_cb() -> None:
        log.info("%s: reconnected to NATS", name)

    options: dict[str, Any] = {
        "servers": [u.strip() for u in s.url.split(",")],
        "name": name,
        "connect_timeout": s.connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1,
        "allow_reconnect": True,
        "pending_size": s.pending_bytes,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
    }
    options.update(callbacks)
    if s.user:
        options["user"], options["password"] = s.user, s.password
    if s.token:
        options["token"] = s.token
    if s.nkeys_seed:
        options["nkeys_seed"] = s.nkeys_seed
    if s.creds_file:
        options["user_credentials"] = s.creds_file
    tls = _tls_context(s)
    if tls is not None:
        options["tls"] = tls
    return await nats.connect(**options)


async def connect_when_available(s: NatsSettings, name: str, stop: asyncio.Event, counters: Counters | None = None,
                                 **callbacks: Any) -> NATS | None:
    """:func:`connect`, which waits for a server that is not there yet; None if ``stop`` is set first.

    With unlimited reconnects nats-py also retries the very first connection forever (each
    failure goes to the error callback: counted, logged at most every 30 s), so a service
    started before NATS waits for it. That wait must not outlive a shutdown request.
    """
    connecting = asyncio.ensure_future(connect(s, name, counters, **callbacks))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if connecting.done():
        await cancel_and_wait(stopping)
        return connecting.result()
    await cancel_and_wait(connecting)
    log.warning("%s: stopped before NATS at %s was reachable", name, s.url)
    return None
