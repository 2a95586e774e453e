"""Pod name, namespace, labels and container names from the node's kubelet (``/pods``).

The cgroup path gives a pod uid and a container id but not the names people search by. The
kubelet on every node serves its pods as a ``PodList`` at ``/pods``, so the agent asks its own
node's kubelet instead of watching the cluster-wide API server (no cluster RBAC beyond
``nodes/proxy``, no load on the API server). Refreshed periodically from a thread; a pod not yet
listed is looked up again on the next refresh.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.metadata.settings import MetadataSettings

log = logging.getLogger(__name__)

# A kubelet with many pods answers with a few MiB; more than this is not a PodList we want.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PodInfo:
    """One pod as the kubelet lists it."""

    uid: str
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    # container id (runtime prefix stripped) -> container name
    containers: dict[str, str] = field(default_factory=dict)


def parse_pod_list(doc: Any) -> dict[str, PodInfo]:
    """Index a kubelet ``PodList`` by pod uid; malformed items are skipped."""
    pods: dict[str, PodInfo] = {}
    items = doc.get("items") if isinstance(doc, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        meta = item.get("metadata") or {}
        status = item.get("status") or {}
        uid, name = meta.get("uid"), meta.get("name")
        if not isinstance(uid, str) or not isinstance(name, str):
            continue
        containers: dict[str, str] = {}
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or []:
                cid, cname = (cs or {}).get("containerID"), (cs or {}).get("name")
                if isinstance(cid, str) and isinstance(cname, str) and cid:
                    containers[cid.split("://", 1)[-1]] = cname
        labels = meta.get("labels") or {}
        pods[uid] = PodInfo(uid, name, str(meta.get("namespace", "")),
                            {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                            containers)
    return pods


class KubeletPods:
    """A periodically refreshed index of this node's pods (refresh() is blocking: run it in a thread)."""

    def __init__(self, settings: MetadataSettings) -> None:
        assert settings.kubelet_url
        self.url = settings.kubelet_url.rstrip("/") + "/pods"
        self.settings = settings
        self.pods: dict[str, PodInfo] = {}
        self.last_error = ""

    def _request(self) -> urllib.request.Request:
        req = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        token_file = self.settings.kubelet_token_file
        if token_file and Path(token_file).is_file():
            req.add_header("Authorization", f"Bearer {Path(token_file).read_text().strip()}")
        return req

    def _tls(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        if self.settings.kubelet_insecure_skip_verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=self.settings.kubelet_ca_file)

    def refresh(self) -> bool:
        """Fetch ``/pods``; on failure keep the previous index and remember why."""
        try:
            with urllib.request.urlopen(self._request(), timeout=10, context=self._tls()) as resp:
                body = resp.read(MAX_RESPONSE_BYTES + 1)
            if len(body) > MAX_RESPONSE_BYTES:
                raise ValueError(f"response over {MAX_RESPONSE_BYTES} bytes")
            self.pods = parse_pod_list(json.loads(body))
        except Exception as exc:  # network, TLS, HTTP status, JSON: all mean "no fresh data"
            if str(exc) != self.last_error:
                log.warning("kubelet %s unreadable (pod names unavailable): %s", self.url, exc)
            self.last_error = str(exc)
            return False
        self.last_error = ""
        return True
