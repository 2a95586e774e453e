"""Fixtures for integration tests: real kernel, real nats-server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from stackfleet.nats_server import NatsServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    # These tests load BPF programs; without root they cannot show anything real.
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (BPF); run them through scripts/test.sh as root")


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server
