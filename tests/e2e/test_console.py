"""An auditor uses the console in a real browser (Debian's Chromium, headless, driven by Playwright)
against a real gateway that ships to a real MLflow server: signs in with a token, filters to one
agent's denials, opens the call, follows it to its MLflow trace, and reads the charts. A token
without castellan:audit gets nothing but the sign-in page; a form posted from another origin is
refused. Screenshots go to $CASTELLAN_TEST_ARTIFACTS (a CI artefact directory) or the test's tmp dir."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from server.testing import GatewayProcess, free_port, run_gateway
from tests.e2e.test_mlflow_ui import CHROMIUM, CHROMIUM_ARGS
from tests.integration.test_audit_shipping import drive, metric, shipping_env
from tests.mlflow_server import run_mlflow

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


def _artifacts(tmp_path: Path) -> Path:
    root = os.environ.get("CASTELLAN_TEST_ARTIFACTS")
    path = Path(root) / "console" if root else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def evil_site(target: str) -> Iterator[str]:
    """Another origin (a page on another loopback port) whose page posts a form to the console."""
    page = (
        f'<!doctype html><form id="f" method="post" action="{target}/console/sign-out">'
        '<input name="csrf" value="guessed"><button id="go" type="submit">Win a prize</button></form>'
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_an_auditor_finds_a_denial_follows_it_to_mlflow_and_reads_the_charts(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    shots = _artifacts(tmp_path)
    with run_mlflow(tmp_path / "mlflow") as mlflow, run_gateway(tmp_path / "gw", shipping_env(mlflow.url)) as gw:
        assert await drive(gw, gw.token("e2e-alpha", groups=["analysts"]), 1, 10, concurrency=2)
        assert await drive(gw, gw.token("e2e-beta", groups=["analysts"]), 11, 10, concurrency=2)
        with anyio.fail_after(90):
            while await metric(gw, "castellan_audit_shipped_calls") < 20:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.3)
        auditor = gw.token("e2e-auditor", scopes=["castellan:audit"], subject="ann@example.com")
        outsider = gw.token("e2e-outsider", scopes=["castellan:approve", "castellan:metrics"])
        with evil_site(gw.base_url) as evil:
            seen = await anyio.to_thread.run_sync(browse, gw, auditor, outsider, evil, shots)
    assert seen["results"] == ["demo.reset"]  # alpha's one denial (every tenth call), nothing of beta's
    assert "destructive" in seen["call"] or "deny" in seen["call"]
    for span in ("authenticate", "policy"):
        assert span in seen["trace"], seen["trace"][:2000]
    assert seen["charts_drawn"] >= 4
    assert "Refused" in seen["forged"]
    assert "origin" in seen["forged"]
    assert seen["after_forgery"].endswith("/console/audit")  # still signed in: the forged sign-out did nothing
    assert seen["outsider"] == "/console/sign-in"
    assert "castellan:audit" in seen["outsider_error"]
    for name in ("sign-in", "denials", "call", "trace", "charts", "forged"):
        assert (shots / f"{name}.png").stat().st_size > 1000


def browse(gw: GatewayProcess, auditor: str, outsider: str, evil: str, shots: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{gw.base_url}/console/")
            assert page.url.endswith("/console/sign-in")
            page.get_by_label("Bearer token").fill(auditor)
            page.screenshot(path=shots / "sign-in.png")
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/console/audit")

            page.get_by_label("Agent").fill("e2e-alpha")
            page.get_by_label("Decision").select_option("deny")
            page.get_by_role("button", name="Search").press("Enter")  # the keyboard, as a user would
            page.wait_for_url("**/console/audit?*agent=e2e-alpha*")
            page.locator("table.calls caption", has_text="Calls 1").wait_for()
            seen["results"] = page.locator("table.calls tbody tr td:nth-child(4)").all_inner_texts()
            page.screenshot(path=shots / "denials.png", full_page=True)

            page.locator("table.calls tbody tr a").first.click()
            page.wait_for_url("**/console/audit/calls/*")
            seen["call"] = page.inner_text("main")
            page.screenshot(path=shots / "call.png", full_page=True)
            href = page.locator("#trace-link").get_attribute("href")
            assert href is not None
            assert href.startswith("http://127.0.0.1:"), href

            trace = browser.new_page(viewport={"width": 1400, "height": 1000})
            trace.goto(href)
            trace.get_by_text("authenticate", exact=True).first.wait_for(timeout=60_000)
            seen["trace"] = trace.inner_text("body")
            trace.screenshot(path=shots / "trace.png")
            trace.close()

            page.get_by_role("link", name="Charts").click()
            page.wait_for_url("**/console/charts")
            page.wait_for_function("document.querySelectorAll('canvas[data-drawn]').length >= 4", timeout=30_000)
            seen["charts_drawn"] = page.locator("canvas[data-drawn]").count()
            page.screenshot(path=shots / "charts.png", full_page=True)
            assert not [e for e in errors if "Content Security Policy" in e], errors

            forged = page.context.new_page()
            forged.goto(evil)
            forged.get_by_role("button", name="Win a prize").click()
            forged.wait_for_load_state()
            seen["forged"] = forged.inner_text("body")
            forged.screenshot(path=shots / "forged.png")
            page.goto(f"{gw.base_url}/console/audit")
            seen["after_forgery"] = page.url

            other = browser.new_context().new_page()
            other.goto(f"{gw.base_url}/console/sign-in")
            other.get_by_label("Bearer token").fill(outsider)
            other.get_by_role("button", name="Sign in").click()
            seen["outsider_error"] = other.get_by_role("alert").inner_text()
            other.goto(f"{gw.base_url}/console/audit")
            seen["outsider"] = other.url.removeprefix(gw.base_url)
        finally:
            browser.close()
    return seen
