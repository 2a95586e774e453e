"""Aggregator configuration: ``STACKFLEET_*`` env vars, the ``[aggregator]`` TOML table, CLI.

The OTLP destination also honours the standard OpenTelemetry variables
``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``OTEL_RESOURCE_ATTRIBUTES`` (applied to every exported
resource as given). ``OTEL_SERVICE_NAME`` is not read: ``service.name`` on a profile names the
*profiled* process (see docs/design/otlp.md), not the aggregator.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from aggregator.delivery.peer_markers import PUT_TIMEOUT_S
from shared.config_file import file_source
from shared.nats_connection import NatsSettings

DEFAULT_OTLP_ENDPOINT = "http://localhost:4317"


def _env_default(name: str, fallback: str) -> str:
    return os.environ.get(name) or fallback


def parse_resource_attributes(text: str) -> dict[str, str]:
    """Parse ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v,k2=v2``, values percent-decoded)."""
    from urllib.parse import unquote

    out = {}
    for part in text.split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            if k.strip():
                out[k.strip()] = unquote(v.strip())
    return out


class AggregatorSettings(BaseSettings):
    """Settings of the central aggregator."""

    model_config = SettingsConfigDict(env_prefix="STACKFLEET_", env_nested_delimiter="__", extra="ignore")

    nats: NatsSettings = Field(default_factory=NatsSettings)
    otlp_endpoint: str | None = Field(
        default_factory=lambda: _env_default("OTEL_EXPORTER_OTLP_ENDPOINT", DEFAULT_OTLP_ENDPOINT)
    )
    # Empty string disables the OTLP exporter (local outputs only).
    # service.name (and service.version) for processes that name no service themselves;
    # "" gives the semantic conventions' unknown_service:<executable name>.
    service_name: str = ""
    service_version: str = ""
    resource_attributes: dict[str, str] = Field(
        default_factory=lambda: parse_resource_attributes(os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    )
    output_dir: Path | None = Path("profiles")
    export_interval_s: float = Field(default=10.0, gt=0.1, le=3600)
    # Retention of the local exports (also what the web page can show): at most this many
    # exports, none older than retention_max_age_s, at most retention_max_bytes in total.
    keep_files: int = Field(default=2160, ge=1)
    retention_max_age_s: float = Field(default=6 * 3600, gt=0)
    retention_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    # "host:port" of the web page (flame graphs of the retained exports); "" disables.
    web_address: str = "127.0.0.1:4040"
    # Access to the page (aggregator/web/access.py): a token, and/or basic auth, and TLS (PEM files).
    web_token: SecretStr | None = None
    web_user: str | None = None
    web_password: SecretStr | None = None
    web_tls_cert: Path | None = None
    web_tls_key: Path | None = None
    queue_group: str = "stackfleet-aggregators"
    # "host:port" for /metrics and /healthz; None disables.
    metrics_address: str | None = None
    # Samples messages waiting for their dictionary (per aggregator) and how long they may wait.
    max_parked_messages: int = Field(default=10_000, ge=10)
    park_timeout_s: float = Field(default=5.0, gt=0)
    # Exports waiting for the OTLP endpoint; beyond this the oldest is dropped (it is still in the local files).
    max_export_queue: int = Field(default=30, ge=1)
    # JetStream samples consumer: a message is acked after the export holding it is written,
    # so it must stay unacked for up to an export interval. If the aggregator dies, the
    # stream redelivers after ack_wait (None = 3 export intervals + 30 s).
    ack_wait_s: float | None = Field(default=None, gt=0)
    # Messages delivered but not yet acked, across all replicas: at least one export interval's
    # worth of sample messages of the whole fleet (about hosts x types x interval / flush interval);
    # a replica waiting for an unshared export marker (max_marker_wait_s) holds several.
    max_ack_pending: int = Field(default=100_000, ge=100)
    # How often the export thread must hand the GIL to intake (aggregator/gil_policy.py).
    gil_switch_interval_s: float = Field(default=0.0005, gt=0, le=0.1)

    @model_validator(mode="after")
    def _ack_wait_covers_export(self) -> AggregatorSettings:
        if self.ack_wait_s is not None and self.ack_wait_s < 2 * self.export_interval_s:
            raise ValueError("ack_wait_s must be at least twice export_interval_s, or messages being "
                             "exported would be redelivered (duplicates)")
        return self

    @property
    def effective_ack_wait_s(self) -> float:
        return self.ack_wait_s if self.ack_wait_s is not None else 3 * self.export_interval_s + 30.0

    @property
    def max_marker_wait_s(self) -> float:
        """How long merged messages may wait for an unshared export marker before being exported.

        Less than the stream's redelivery (ack_wait after delivery): a message is merged up to
        ``park_timeout_s`` after its delivery, the wait is checked once an interval, and the
        export then takes up to an interval and one more marker put before its acks."""
        margin = 2 * self.export_interval_s + self.park_timeout_s + PUT_TIMEOUT_S
        return max(0.0, self.effective_ack_wait_s - margin)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, file_source(settings_cls, "aggregator"))
