"""Settings for process metadata: service-name rules and the optional kubelet source."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator


class ServiceRule(BaseModel):
    """``service`` names processes whose fields match every regex given (unset = any).

    ``service`` may use ``{comm}``, ``{exe}`` (base name), ``{pod}``, ``{namespace}`` and
    ``{container}`` placeholders, e.g. ``{namespace}/{container}``.
    """

    service: str
    comm: str | None = None
    exe: str | None = None
    cgroup: str | None = None

    @field_validator("comm", "exe", "cgroup")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"bad regex {v!r}: {exc}") from exc
        return v


class MetadataSettings(BaseModel):
    """How the agent finds out what a process is (``STACKFLEET_METADATA__*``)."""

    enabled: bool = True
    # Environment variables of the *profiled process* that name its service, first found wins.
    service_env_vars: list[str] = Field(default_factory=lambda: ["OTEL_SERVICE_NAME"])
    # Pod label that names the service when the kubelet source is configured.
    service_pod_label: str = "app.kubernetes.io/name"
    # Tried in order after the environment and the pod label.
    service_rules: list[ServiceRule] = Field(default_factory=list)
    # Kubelet API for pod name/namespace/labels, e.g. https://127.0.0.1:10250 (None = cgroup only).
    kubelet_url: str | None = None
    kubelet_token_file: str | None = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    kubelet_ca_file: str | None = None
    kubelet_insecure_skip_verify: bool = False
    kubelet_refresh_s: float = Field(default=30.0, gt=0)
    # How often /proc is scanned for new processes (resolved at first sight, while alive).
    scan_interval_s: float = Field(default=1.0, gt=0)
    # Per-process cache lifetime; a reused PID is re-resolved when its start time changes.
    cache_ttl_s: float = Field(default=60.0, gt=0)
    max_cached_processes: int = Field(default=65_536, ge=16)
