"""An auditor uses the console in a real browser (Debian's Chromium, headless, driven by Playwright)
against a real gateway that ships to a real MLflow server: signs in with a token, filters to one
agent's denials, opens the call, follows it to its MLflow trace, and reads the charts. A token
without castellan:audit gets nothing but the sign-in page; a form posted from another origin is
refused. Screenshots go to $CASTELLAN_TEST_ARTIFACTS (a CI artefact directory) or the test's tmp dir."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.e2e.test_mlflow_ui import CHROMIUM, CHROMIUM_ARGS
from tests.gateway_process import GatewayProcess, free_port, run_cli, run_gateway
from tests.integration.test_audit_shipping import drive, metric, shipping_env
from tests.mcp_upstream import conformance_upstream
from tests.mlflow_server import MlflowServer

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


def _artifacts(tmp_path: Path) -> Path:
    root = os.environ.get("CASTELLAN_TEST_ARTIFACTS")
    path = Path(root) / "console" if root else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server`, given longer to start than the shared fixture (2 cores shared by many)."""
    root.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(root, free_port())
    try:
        server.start(timeout=300)
        yield server
    finally:
        server.stop()


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


@pytest.mark.timeout(900)
async def test_an_auditor_finds_a_denial_follows_it_to_mlflow_and_reads_the_charts(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    shots = _artifacts(tmp_path)
    with (
        mlflow_server(tmp_path / "mlflow") as mlflow,
        run_gateway(tmp_path / "gw", shipping_env(mlflow.url), timeout=180) as gw,
    ):
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
    for span in ("demo.reset", "authenticate", "grants", "missing privilege"):  # the call refused at grants
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
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
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

            forged = context.new_page()  # the same browser, signed in: its cookie would go along
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


@pytest.mark.timeout(600)
async def test_an_approver_approves_a_pending_call_in_the_browser_and_the_audit_trail_says_who(tmp_path: Path) -> None:
    """An analyst's echo call waits for a lead; the lead approves it in the console with a comment; the
    call runs, and its audit record names the lead as the approver."""
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    from tests.integration.conftest import raw_call
    from tests.integration.test_approvals import policies_with

    shots = _artifacts(tmp_path)
    policies = policies_with(tmp_path, {"echo": {"approval": {"groups": ["leads"], "reason": "echo needs a lead",
                                                              "timeout_seconds": 240}}})  # fmt: skip
    with run_gateway(tmp_path / "gw", {"CASTELLAN_POLICY__PATH": str(policies)}, timeout=180) as gw:
        analyst = gw.token("e2e-analyst", groups=["analysts"], subject="bob@example.com")
        lead = gw.token("e2e-lead", groups=["leads"], subject="lena@example.com",
                        scopes=["castellan:audit", "castellan:approve"])  # fmt: skip
        waiting = asyncio.create_task(raw_call(gw, analyst, "echo", {"text": "please approve me"}))
        seen = await anyio.to_thread.run_sync(approve_in_browser, gw, lead, shots)
        with anyio.fail_after(60):
            result = await waiting
        records = await anyio.to_thread.run_sync(audit_records, gw, "echo")
    assert "please approve me" in seen["pending"]
    assert "echo needs a lead" in seen["pending"]
    assert "Approved" in seen["after"]
    assert result.get("isError") is not True, result
    assert "please approve me" in json.dumps(result)
    [record] = records
    assert record["decision"] == "allow"
    assert record["approval"]["decided_by"]["subject"] == "lena@example.com"
    assert record["approval"]["comment"] == "checked with bob"
    assert (shots / "approval.png").stat().st_size > 1000


def audit_records(gw: GatewayProcess, tool: str) -> list[dict[str, Any]]:
    """The tool's calls as `castellan audit search` prints them (the auditors' own reading of the trail)."""
    found = run_cli(gw, "audit", "search", "--tool", tool, "--format", "jsonl", timeout=60)
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


def approve_in_browser(gw: GatewayProcess, lead: str, shots: Path) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    seen: dict[str, str] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{gw.base_url}/console/sign-in")
            page.get_by_label("Bearer token").fill(lead)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/console/audit")
            page.get_by_role("link", name="Approvals").click()
            deadline = time.monotonic() + 60
            while not page.get_by_role("button", name="Approve").count() and time.monotonic() < deadline:
                page.wait_for_timeout(500)
                page.reload()
            seen["pending"] = page.inner_text("main")
            page.get_by_label("Comment (recorded with your decision)").first.fill("checked with bob")
            page.screenshot(path=shots / "approval.png", full_page=True)
            page.get_by_role("button", name="Approve").first.click()
            page.get_by_role("status").wait_for()
            seen["after"] = page.inner_text("main")
            page.screenshot(path=shots / "approved.png", full_page=True)
        finally:
            browser.close()
    return seen


@pytest.mark.timeout(900)
async def test_an_auditor_reads_the_shadow_chart_and_finds_a_resource_and_a_prompt_in_the_catalog(
    tmp_path: Path,
) -> None:
    """A candidate policy that retires echo decides beside the live one; the auditor sees its
    disagreements charted (and tabled), and the upstream's resources and prompts in the catalog with
    their securables and who holds what on them."""
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    import shutil

    from server.settings import REPO_ROOT
    from tests.integration.conftest import raw_call
    from tests.integration.test_shadow_and_replay import CANDIDATE_RULE

    shots = _artifacts(tmp_path)
    candidate = tmp_path / "candidate"
    shutil.copytree(REPO_ROOT / "policies", candidate)
    (candidate / "castellan" / "retire_echo.rego").write_text(CANDIDATE_RULE)
    with conformance_upstream() as upstream:
        env = {
            "CASTELLAN_POLICY__SHADOW_PATH": str(candidate),
            "CASTELLAN_UPSTREAMS": json.dumps([{"name": "fixture", "url": upstream}]),
        }
        with run_gateway(tmp_path / "gw", env, timeout=180) as gw:
            analyst = gw.token("e2e-analyst", groups=["analysts"])
            for i in range(4):  # allowed live, denied by the candidate: four disagreements
                await raw_call(gw, analyst, "echo", {"text": f"hello {i}"})
            await raw_call(gw, analyst, "clock.now", {})  # the candidate agrees
            auditor = gw.token("e2e-auditor", scopes=["castellan:audit"], subject="ann@example.com")
            seen = await anyio.to_thread.run_sync(read_shadow_and_catalog, gw, auditor, shots)
    assert "allow → deny" in seen["shadow"]
    assert "Agreement per live and shadow policy version" in seen["shadow"]
    assert seen["shadow_row"][2:5] == ["5", "1", "4"]  # decided by both, agree, allow -> deny
    assert "fixture.static-text" in seen["catalog"]
    assert "fixture.test_prompt_with_arguments" in seen["catalog"]
    assert "main.upstream.fixture__resource__test_static_text" in seen["resource"]
    assert "READ on RESOURCE" in seen["resource"]
    assert "admins" in seen["resource"]  # ALL PRIVILEGES on main, inherited (demo grants)
    assert "EXECUTE on FUNCTION" in seen["prompt"]
    for name in ("charts-shadow", "catalog", "catalog-resource", "catalog-prompt"):
        assert (shots / f"{name}.png").stat().st_size > 1000


def read_shadow_and_catalog(gw: GatewayProcess, auditor: str, shots: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{gw.base_url}/console/sign-in")
            page.get_by_label("Bearer token").fill(auditor)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url("**/console/audit")

            page.get_by_role("link", name="Charts").click()
            page.wait_for_url("**/console/charts")
            deadline = time.monotonic() + 90  # allowed calls' outcomes (the shadow verdicts) are group-committed
            while not page.locator("canvas#shadow-disagreements").count() and time.monotonic() < deadline:
                time.sleep(1)
                page.reload()
            page.locator("canvas#shadow-disagreements[data-drawn]").wait_for(timeout=30_000)
            section = page.locator("section", has=page.locator("#shadow-disagreements-title"))
            seen["shadow"] = section.inner_text() + json.dumps(
                json.loads(page.locator("canvas#shadow-disagreements").get_attribute("data-chart") or "{}")
            , ensure_ascii=False)  # fmt: skip
            seen["shadow_row"] = section.locator("table.summary tbody tr").first.locator("th, td").all_inner_texts()
            section.scroll_into_view_if_needed()
            page.screenshot(path=shots / "charts-shadow.png", full_page=True)

            page.get_by_role("link", name="Catalog").click()
            page.wait_for_url("**/console/catalog")
            seen["catalog"] = page.inner_text("main")
            page.screenshot(path=shots / "catalog.png", full_page=True)
            page.get_by_role("link", name="fixture.static-text", exact=True).click()
            page.wait_for_url("**/console/catalog/resources/*")
            seen["resource"] = page.inner_text("main")
            page.screenshot(path=shots / "catalog-resource.png", full_page=True)
            page.go_back()
            page.get_by_role("link", name="fixture.test_prompt_with_arguments", exact=True).click()
            page.wait_for_url("**/console/catalog/prompts/*")
            seen["prompt"] = page.inner_text("main")
            page.screenshot(path=shots / "catalog-prompt.png", full_page=True)
        finally:
            browser.close()
    return seen


@pytest.mark.timeout(600)
async def test_a_person_signs_in_through_the_dev_issuers_page_by_clicking(tmp_path: Path) -> None:
    """ "Sign in with this gateway's dev issuer": the browser goes to the dev issuer's sign-in page, the
    person picks the administrator and allows; the console exchanged the code (PKCE) and verified the
    token, and shows the audit trail. An analyst (no castellan:* scope granted) stays at the sign-in page."""
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-test-deps")
    shots = _artifacts(tmp_path)
    with run_gateway(tmp_path / "gw", {}, timeout=180) as gw:
        seen = await anyio.to_thread.run_sync(sign_in_at_the_issuer, gw, shots)
        log = gw.log_path.read_text()
    assert seen["issuer_page"].startswith("/oauth2/authorize?")
    assert "code_challenge_method=S256" in seen["issuer_page"]
    assert "Castellan dev sign-in" in seen["issuer_text"]
    assert "Castellan console" in seen["issuer_text"]  # the client the console registered for itself
    assert seen["landed"] == "/console/audit"
    assert "olivia" in seen["signed_in_as"]
    assert seen["analyst"] == "/console/sign-in"
    assert "castellan:audit" in seen["analyst_error"]
    assert log.count("console_oauth_client_registered") == 1  # registered once, used by both sign-ins
    for name in ("oauth-sign-in", "oauth-issuer", "oauth-signed-in"):
        assert (shots / f"{name}.png").stat().st_size > 1000


def sign_in_at_the_issuer(gw: GatewayProcess, shots: Path) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    seen: dict[str, str] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{gw.base_url}/console/")
            page.screenshot(path=shots / "oauth-sign-in.png")
            page.get_by_role("link", name="Sign in with this gateway's dev issuer").click()
            page.wait_for_url("**/oauth2/authorize?*")
            seen["issuer_page"] = page.url.removeprefix(gw.base_url)
            seen["issuer_text"] = page.inner_text("body")
            page.get_by_label("olivia").check()
            page.screenshot(path=shots / "oauth-issuer.png", full_page=True)
            page.get_by_role("button", name="Sign in and allow").click()
            page.wait_for_url("**/console/audit")
            seen["landed"] = page.url.removeprefix(gw.base_url)
            seen["signed_in_as"] = page.inner_text("header")
            page.screenshot(path=shots / "oauth-signed-in.png", full_page=True)

            analyst = browser.new_page()
            analyst.goto(f"{gw.base_url}/console/sign-in")
            analyst.get_by_role("link", name="Sign in with this gateway's dev issuer").click()
            analyst.wait_for_url("**/oauth2/authorize?*")
            analyst.get_by_label("alice").check()
            analyst.get_by_role("button", name="Sign in and allow").click()
            analyst.wait_for_url("**/console/oauth/callback?*")
            seen["analyst_error"] = analyst.get_by_role("alert").inner_text()
            analyst.goto(f"{gw.base_url}/console/audit")
            seen["analyst"] = analyst.url.removeprefix(gw.base_url)
        finally:
            browser.close()
    return seen
