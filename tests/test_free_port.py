"""free_port never hands out the same port twice in one process, even when the kernel picks
a closed port again (a server started later would find it taken, or answer in its place)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from stackfleet import nats_server
from stackfleet.nats_server import free_port


class _Picks:
    """A stand-in socket whose kernel picks are the given ports, in order."""

    picks: list[int] = []

    def __init__(self, *args: Any) -> None:
        pass

    def __enter__(self) -> _Picks:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return "127.0.0.1", _Picks.picks.pop(0)


def test_a_port_picked_again_by_the_kernel_is_not_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nats_server, "_handed_out", set())
    monkeypatch.setattr(nats_server.socket, "socket", _Picks)
    _Picks.picks = [40001, 40001, 40001, 40002]
    assert [free_port(), free_port()] == [40001, 40002]
    _Picks.picks = [40001] * nats_server._PICKS
    with pytest.raises(OSError, match="no free port"):
        free_port()


def test_real_ports_are_distinct_and_bindable() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
