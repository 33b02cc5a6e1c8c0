"""An auditor opens the MLflow UI in a real browser (Debian's Chromium, headless, driven by
Playwright) and finds a call's trace with its pipeline spans, shipped there by the gateway."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from tests.gateway_process import run_gateway
from tests.integration.test_audit_shipping import drive, metric, shipping_env
from tests.mlflow_server import run_mlflow

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
CHROMIUM = Path("/usr/bin/chromium")
# Chromium in a closed network: no background fetches, no first-run or sync traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    return CHROMIUM


@pytest.mark.usefixtures("chromium")
async def test_a_call_trace_and_its_spans_show_in_the_mlflow_ui(tmp_path: Path) -> None:
    with run_mlflow(tmp_path / "mlflow") as mlflow, run_gateway(tmp_path / "gw", shipping_env(mlflow.url)) as gw:
        outcomes = await drive(gw, gw.token("ui-auditor", groups=["analysts"]), 1, 3, concurrency=1)
        assert outcomes == [True, True, True]
        with anyio.fail_after(60):
            while await metric(gw, "castellan_audit_shipped_calls") < 3:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.3)
        text = await anyio.to_thread.run_sync(open_trace_in_browser, mlflow.url)
    for span in ("authenticate", "admit", "grants", "policy", "record", "tool"):
        assert f"\n{span}\n" in text, f"span {span} not shown:\n{text[:2000]}"
    assert "call 2" in text  # the call's arguments, as the trace's inputs


def open_trace_in_browser(mlflow_url: str) -> str:
    """The experiment's trace list, then the trace of the call with text "call 2": the page's text."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    experiment = MlflowClient(mlflow_url).get_experiment_by_name("castellan-audit")
    assert experiment is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{mlflow_url}/#/experiments/{experiment.experiment_id}/traces")
            row = page.get_by_text('{"tool": "echo", "arguments": {"text": "call 2"}}').first
            row.wait_for(timeout=30_000)
            got_it = page.get_by_role("button", name="Got it")  # a first-visit tip covering the list
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not got_it.count():
                page.wait_for_timeout(200)
            if got_it.count():
                got_it.click()
            row.click()
            page.get_by_text("Spans", exact=True).first.wait_for(timeout=30_000)
            page.get_by_text("authenticate", exact=True).first.wait_for(timeout=30_000)
            return page.inner_text("body")
        finally:
            browser.close()
