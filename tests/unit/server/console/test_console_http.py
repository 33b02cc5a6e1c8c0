"""The console over HTTP: sign-in, roles, CSRF and origin checks, security headers, the audit pages."""

from __future__ import annotations

import html
import json
import re

from server.console.session import COOKIE
from tests.unit.server.console.conftest import BASE, ConsoleRig

PAGES = ["/console/audit", "/console/audit/chain", "/console/audit/runs/run-1", "/console/audit/calls/x"]


def test_without_a_session_every_page_leads_to_the_sign_in_page(rig: ConsoleRig) -> None:
    for page in PAGES:
        response = rig.client.get(page, follow_redirects=False)
        assert response.status_code == 303, page
        assert response.headers["location"] == "/console/sign-in"


def test_a_token_without_the_audit_scope_gets_only_the_sign_in_page(rig: ConsoleRig) -> None:
    rig.record(agent="secret-agent")
    response = rig.sign_in("castellan:approve", "castellan:metrics")
    assert response.status_code == 403
    assert "castellan:audit" in response.text
    assert COOKIE not in response.cookies
    for page in PAGES:
        assert rig.client.get(page, follow_redirects=False).status_code == 303
    assert "secret-agent" not in rig.client.get("/console/audit").text


def test_a_refused_token_is_said_so_and_signs_nobody_in(rig: ConsoleRig) -> None:
    page = rig.client.get("/console/sign-in").text
    response = rig.client.post(
        "/console/sign-in", data={"token": "eyJhbGciOiJub25lIn0.e30.", "csrf": rig.csrf(page)}, headers={"origin": BASE}
    )
    assert response.status_code == 401
    assert "The token was refused" in response.text
    assert rig.client.get("/console/audit", follow_redirects=False).status_code == 303


def test_signing_in_sets_a_strict_http_only_cookie_and_opens_the_audit_trail(rig: ConsoleRig) -> None:
    response = rig.sign_in("castellan:audit")
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/console"):
        assert attribute.lower() in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http on loopback; Secure when served over TLS
    page = rig.client.get("/console/audit")
    assert page.status_code == 200
    assert "Signed in as" in page.text


def test_every_answer_carries_a_strict_content_security_policy(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    for path in ["/console/sign-in", "/console/audit", "/console/static/console.css"]:
        headers = rig.client.get(path).headers
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "same-origin"  # no-referrer would make the browser post `Origin: null`
        assert headers["x-content-type-options"] == "nosniff"


def test_no_page_has_inline_script_or_style(rig: ConsoleRig) -> None:
    rig.record()
    rig.sign_in("castellan:audit")
    call_id = rig.record()
    for path in ["/console/sign-in", "/console/audit", f"/console/audit/calls/{call_id}", "/console/audit/runs/run-1"]:
        text = rig.client.get(path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), path
        for inline in ("<style", " style=", " onclick=", " onload=", "javascript:"):
            assert inline not in text, (path, inline)


def test_a_request_from_another_origin_is_refused(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    page = rig.client.get("/console/audit").text
    csrf = rig.csrf(page)
    forged = rig.client.post("/console/sign-out", data={"csrf": csrf}, headers={"origin": "https://evil.example"})
    assert forged.status_code == 403
    assert "origin" in forged.text
    no_origin = rig.client.post("/console/sign-out", data={"csrf": csrf})
    assert no_origin.status_code == 403
    assert rig.client.get("/console/audit", follow_redirects=False).status_code == 200  # still signed in


def test_a_request_without_this_sessions_csrf_token_is_refused(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    other_session_token = rig.csrf(rig.client.get("/console/audit").text)
    missing = rig.client.post("/console/sign-out", data={}, headers={"origin": BASE})
    assert missing.status_code == 403
    assert "CSRF" in missing.text
    rig.sign_in("castellan:audit")  # a new session: the old form token is worth nothing
    stale = rig.client.post("/console/sign-out", data={"csrf": other_session_token}, headers={"origin": BASE})
    assert stale.status_code == 403
    good = rig.client.post(
        "/console/sign-out", data={"csrf": rig.csrf(rig.client.get("/console/audit").text)}, headers={"origin": BASE},
        follow_redirects=False,
    )  # fmt: skip
    assert good.status_code == 303
    assert rig.client.get("/console/audit", follow_redirects=False).status_code == 303


def test_a_sign_in_forged_from_another_origin_is_refused(rig: ConsoleRig) -> None:
    page = rig.client.get("/console/sign-in").text
    response = rig.client.post(
        "/console/sign-in", data={"token": rig.token("castellan:audit"), "csrf": rig.csrf(page)},
        headers={"origin": "http://attacker.test"},
    )  # fmt: skip
    assert response.status_code == 403
    assert rig.client.get("/console/audit", follow_redirects=False).status_code == 303


def test_filtering_to_one_agents_denials_shows_only_those(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    mine = rig.record(agent="alpha", denied="policy: no sales data for alpha")
    rig.record(agent="alpha")
    rig.record(agent="beta", denied="policy: not beta")
    page = rig.client.get("/console/audit", params={"agent": "alpha", "decision": "deny"}).text
    assert mine in page
    assert page.count("/console/audit/calls/") == 1
    assert "no sales data for alpha" in page
    assert "not beta" not in page


def test_the_results_come_as_a_fragment_to_htmx(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    rig.record(agent="alpha")
    fragment = rig.client.get("/console/audit", params={"agent": "alpha"},
                              headers={"hx-request": "true", "hx-target": "results"}).text  # fmt: skip
    assert "<html" not in fragment
    assert "<table" in fragment


def test_a_filter_that_cannot_be_applied_is_said_so(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    response = rig.client.get("/console/audit", params={"since": "last tuesday"})
    assert response.status_code == 400
    assert "since: expected a date and time" in response.text


def test_a_call_shows_its_full_record_with_arguments_redacted(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    call_id = rig.record(arguments={"q": "hello", "password": "hunter2", "note": "sk-abcdefghijklmnopqrstuvwx"})
    page = rig.client.get(f"/console/audit/calls/{call_id}").text
    assert "hunter2" not in page
    assert "sk-abcdefghijklmnopqrstuvwx" not in page
    assert "hello" in page
    assert "Timings per stage" in page
    assert "Decision input" in page
    assert "not shipped yet" in page


def test_an_unknown_call_is_not_found(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    response = rig.client.get("/console/audit/calls/nope")
    assert response.status_code == 404


def test_a_run_shows_its_calls_and_llm_requests_in_order(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    first = rig.record(run_id="run-7", tool="sql.query")
    second = rig.record(run_id="run-7", tool="gpt-test", action="llm")
    rig.record(run_id="run-8")
    page = rig.client.get("/console/audit/runs/run-7").text
    assert page.index(first) < page.index(second)
    assert "1 LLM requests" in page or "(1 LLM requests" in page
    assert page.count("/console/audit/calls/") == 2
    assert "<svg" in page


def test_the_chain_page_verifies_the_real_chain(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    rig.record()
    rig.record(denied="no")
    assert rig.client.get("/console/audit/chain").status_code == 200
    status = rig.client.get("/console/audit/chain/verify").text
    assert "Intact" in status
    assert "3 records" in status


def test_the_charts_show_calls_denials_spend_reasons_and_policy_versions(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    rig.record(agent="alpha", tool="echo", policy_version="v1")
    rig.record(agent="alpha", tool="sql.query", denied="policy: no", policy_version="v1")
    rig.record(agent="beta", tool="echo", denied="policy: no", policy_version="v2")
    rig.record(agent="beta", tool="echo", denied="too many calls", stage="admit", policy_version="v2")
    page = rig.client.get("/console/charts", params={"window": "24h"}).text
    for chart in ("calls-by-tool", "denials-by-stage", "token-spend", "denial-reasons", "policy-versions"):
        assert f'id="{chart}"' in page, chart
    assert "data-chart='" in page
    assert '<th scope="row">policy: no</th><td>2</td>' in page  # the top reason, as a table too
    assert '<th scope="row">alpha</th><td>20</td>' in page  # spend from the audit log (10 in + 10 out)
    assert "+" in page.split('id="policy-versions"')[1]  # the deny rate's change from v1 to v2


def _shadow(change: str | None, version: str = "cand-1") -> dict[str, object]:
    return {"allow": change != "allow_to_deny", "reasons": [], "obligations": {}, "policy_version": version,
            "differs": change is not None, "change": change}  # fmt: skip


def test_the_shadow_chart_counts_disagreements_by_kind_with_each_versions_agreement(rig: ConsoleRig) -> None:
    rig.sign_in("castellan:audit")
    page = rig.client.get("/console/charts", params={"window": "24h"}).text
    assert "No shadow decisions in this window" in page  # no shadow policy: said so, nothing drawn
    assert 'id="shadow-disagreements"' not in page
    for _ in range(3):
        rig.record(tool="echo", shadow=_shadow(None))  # agreed (an allowed call: in its outcome record)
    rig.record(tool="echo", shadow=_shadow("allow_to_deny"))
    rig.record(tool="echo", shadow=_shadow("allow_to_deny"))
    rig.record(tool="echo", denied="policy: no", shadow=_shadow("deny_to_allow"))  # in the decision record
    rig.record(tool="echo", shadow={"error": "timed out", "differs": False, "policy_version": "cand-1"})
    rig.record(tool="echo")  # no shadow decision at all: not counted
    page = rig.client.get("/console/charts", params={"window": "24h"}).text
    shadow = page.split('id="shadow-disagreements-title"')[1]
    assert 'id="shadow-disagreements"' in shadow
    spec = json.loads(html.unescape(shadow.split("data-chart='")[1].split("'")[0]))
    assert {s["name"]: sum(s["values"]) for s in spec["series"]} == {
        "allow → deny": 2, "deny → allow": 1, "shadow error": 1,
    }  # fmt: skip
    # the agreement table: decided by both 7, agree 3, allow->deny 2, deny->allow 1, other 0, errors 1; 3 of 6 differ
    cells = ["v1</th>", "cand-1", "7", "3", "2", "1", "0", "1", "50.0%</td>"]
    assert '<th scope="row">' + "</td><td>".join(cells).replace("</th></td>", "</th>") in shadow
    found = rig.client.get("/console/audit", params={"shadow_diff": "1"}).text
    assert "Calls 1\u20133, newest first" in found  # the chart's link: the three calls decided otherwise


def test_a_request_for_another_host_name_is_refused(rig: ConsoleRig) -> None:
    response = rig.client.get("/console/sign-in", headers={"host": "rebound.evil.example:8750"})
    assert response.status_code == 421
    assert "Host check" in response.text
