"""Container id and Kubernetes pod uid from a process's cgroup paths.

Container runtimes name a container's cgroup after its 64-hex-digit id, and the kubelet puts
each pod's containers under a cgroup named after the pod uid, in the two layouts it supports:

    cgroupfs driver:  /kubepods/burstable/pod<uid>/<container id>
    systemd driver:   /kubepods.slice/kubepods-burstable.slice/
                          kubepods-burstable-pod<uid with _ for ->.slice/cri-containerd-<id>.scope
    Docker alone:     /docker/<id>   or   /system.slice/docker-<id>.scope
    Podman:           /machine.slice/libpod-<id>.scope

Parsing the path is what every profiler and log collector does (no library for it exists in
Python); it needs no API access and works for processes that exit a moment later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The last 64-hex token in a path component, optionally prefixed by a runtime name
# (docker-, cri-containerd-, crio-, libpod-) and suffixed by .scope.
_CONTAINER_ID = re.compile(r"(?:^|[-/:])([0-9a-f]{64})(?:\.scope)?$")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    """What a process's cgroup membership says about where it runs."""

    path: str
    container_id: str = ""
    pod_uid: str = ""


def parse_cgroup_file(text: str) -> CgroupInfo:
    """Parse ``/proc/PID/cgroup`` (v1, v2 or hybrid): the first line naming a container wins.

    The unified (``0::``) path is preferred as ``path``; v1 hierarchies are searched too because
    hybrid hosts may keep the container's path only in a named hierarchy.
    """
    paths: list[str] = []
    unified = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            unified = parts[2]
            paths.insert(0, parts[2])
        else:
            paths.append(parts[2])
    for path in paths:
        info = parse_cgroup_path(path)
        if info.container_id or info.pod_uid:
            return info
    return CgroupInfo(path=unified or (paths[0] if paths else ""))


def parse_cgroup_path(path: str) -> CgroupInfo:
    """Container id and pod uid from one cgroup path (either may be empty)."""
    container_id = pod_uid = ""
    for component in path.split("/"):
        if not component:
            continue
        m = _POD_UID.search(component)
        if m:
            pod_uid = m.group(1).replace("_", "-")
            continue
        m = _CONTAINER_ID.search(component)
        if m:
            container_id = m.group(1)
    return CgroupInfo(path=path, container_id=container_id, pod_uid=pod_uid)
