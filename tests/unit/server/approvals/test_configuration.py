"""Approval settings that cannot work, or are unsafe in production, stop start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.approvals.queue import ApprovalQueue
from server.audit.redaction import Redactor
from server.errors import ConfigError
from server.production import unsafe_settings
from server.settings import load_settings


def test_a_webhook_without_a_secret_to_sign_it_stops_start_up(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, approvals={"webhook_url": "https://hooks.example/approvals"})
    with pytest.raises(ConfigError, match=r"needs approvals\.webhook_secret"):
        ApprovalQueue.from_settings(settings, Redactor())


def test_production_refuses_a_webhook_in_clear_text_off_the_machine(tmp_path: Path) -> None:
    remote = load_settings(data_dir=tmp_path, approvals={"webhook_url": "http://hooks.example/approvals"})
    local = load_settings(data_dir=tmp_path, approvals={"webhook_url": "http://127.0.0.1:9000/approvals"})
    tls = load_settings(data_dir=tmp_path, approvals={"webhook_url": "https://hooks.example/approvals"})
    assert "approvals.webhook_url" in {u.setting for u in unsafe_settings(remote)}
    assert "approvals.webhook_url" not in {u.setting for u in unsafe_settings(local)}
    assert "approvals.webhook_url" not in {u.setting for u in unsafe_settings(tls)}


def test_an_unknown_queue_backend_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown approvals backend 'postgres'; choose from auto, redis, sqlite"):
        ApprovalQueue.from_settings(load_settings(data_dir=tmp_path, approvals={"backend": "postgres"}), Redactor())


def test_auto_puts_the_queue_where_the_meters_are(tmp_path: Path) -> None:
    from server.approvals.store import approval_backend

    assert approval_backend(load_settings(data_dir=tmp_path)) == "sqlite"
    assert approval_backend(load_settings(data_dir=tmp_path, metering={"backend": "redis"})) == "redis"


def test_the_approval_page_is_the_console_s_unless_another_is_set(tmp_path: Path) -> None:
    def page(**overrides: object) -> str:
        queue = ApprovalQueue.from_settings(load_settings(data_dir=tmp_path, **overrides), Redactor())
        return queue.approval_url("apr_1")

    assert page() == "http://127.0.0.1:8750/console/approvals/apr_1"
    assert page(console={"enabled": False}) == ""
    assert page(approvals={"approval_page_url": "https://ops.example/a/{id}"}) == "https://ops.example/a/apr_1"
