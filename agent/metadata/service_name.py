"""Choosing a process's ``service.name``: its own declaration first, then pod label, then rules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from agent.metadata.settings import MetadataSettings, ServiceRule


@dataclass(frozen=True, slots=True)
class ProcessFacts:
    """What the rules can look at."""

    comm: str
    exe: str
    cgroup: str
    environ: dict[str, str]
    pod: str = ""
    namespace: str = ""
    container: str = ""
    pod_labels: tuple[tuple[str, str], ...] = ()


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _matches(rule: ServiceRule, facts: ProcessFacts) -> bool:
    for pattern, value in ((rule.comm, facts.comm), (rule.exe, facts.exe), (rule.cgroup, facts.cgroup)):
        if pattern is not None and not _regex(pattern).search(value):
            return False
    return True


def _render(template: str, facts: ProcessFacts) -> str:
    try:
        return template.format(comm=facts.comm, exe=facts.exe, pod=facts.pod,
                               namespace=facts.namespace, container=facts.container)
    except (KeyError, IndexError, ValueError):
        return template  # a template with unknown placeholders is used literally


def service_name(settings: MetadataSettings, facts: ProcessFacts) -> tuple[str, str]:
    """(service name, where it came from) or ("", "") when nothing names the process.

    Order: the process's own environment (``OTEL_SERVICE_NAME`` by default, which the process's
    OTel SDK would use too), the pod label, then the first matching rule.
    """
    for var in settings.service_env_vars:
        value = facts.environ.get(var, "").strip()
        if value:
            return value, f"env:{var}"
    labels = dict(facts.pod_labels)
    if settings.service_pod_label and labels.get(settings.service_pod_label):
        return labels[settings.service_pod_label], "pod_label"
    for rule in settings.service_rules:
        if _matches(rule, facts):
            return _render(rule.service, facts), "rule"
    return "", ""
