"""One actor per profile type. ``ACTORS`` maps each implemented type to its actor class."""

from __future__ import annotations

from agent.actors.base import ActorContext, ProfileActor
from agent.actors.cpu import CpuActor
from agent.actors.goroutine import GoroutineActor
from agent.actors.heap import HeapActor
from agent.actors.lock import LockActor
from agent.actors.wall import WallActor
from shared.profile_types import ProfileType

ACTORS: dict[ProfileType, type[ProfileActor]] = {
    ProfileType.CPU: CpuActor,
    ProfileType.LOCK: LockActor,
    ProfileType.WALL: WallActor,
    ProfileType.GOROUTINE: GoroutineActor,
    ProfileType.HEAP: HeapActor,
}

__all__ = ["ACTORS", "ActorContext", "ProfileActor"]
