"""Agent settings that were replaced are reported, not silently ignored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.settings import AgentSettings


def test_a_replaced_setting_from_the_environment_is_reported_and_the_new_one_read(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("STACKFLEET_MAX_PENDING_EVENTS", "100")
    monkeypatch.setenv("STACKFLEET_MAX_PENDING_BYTES", "1048576")
    with caplog.at_level(logging.WARNING, logger="agent.settings"):
        settings = AgentSettings()
    assert settings.max_pending_bytes == 1 << 20
    assert [r.getMessage() for r in caplog.records] == [
        "setting max_pending_events is no longer read: it was replaced by max_pending_bytes (see agent/settings.py)"]


def test_a_replaced_setting_given_directly_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.settings"):
        settings = AgentSettings(max_pending_events=100)  # type: ignore[call-arg]
    assert settings.max_pending_bytes == 32 * 1024 * 1024
    assert len(caplog.records) == 1 and "max_pending_events" in caplog.records[0].getMessage()


def test_settings_without_replaced_names_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.settings"):
        AgentSettings(max_pending_bytes=1 << 20)
    assert caplog.records == []


def test_a_replaced_setting_in_the_config_file_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "stackfleet.toml"
    config.write_text("[agent]\nmax_pending_events = 100\n")
    monkeypatch.setenv("STACKFLEET_CONFIG", str(config))
    with caplog.at_level(logging.WARNING, logger="agent.settings"):
        AgentSettings()
    assert len(caplog.records) == 1 and "replaced by max_pending_bytes" in caplog.records[0].getMessage()
