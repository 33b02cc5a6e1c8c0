"""Audit pages: search and filter, one call in full, a run's timeline, the chain's status."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.audit.search import show
from server.audit.traces import trace_id_for
from server.console import audit_views as views
from server.console.context import console_of, redirect
from server.console.mlflow_link import trace_url


async def home(request: Request) -> Response:
    return redirect("/console/audit", request)


async def search_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    fragment = request.headers.get("hx-request") == "true" and request.headers.get("hx-target") == "results"
    template = "audit/_results.html" if fragment else "audit/search.html"
    if console.index is None:
        return console.render(request, "unavailable.html", user, status=501,
                              what="This audit backend has no search.")  # fmt: skip
    try:
        query, page = views.query_from(request.query_params)
    except views.BadFilter as exc:
        return console.render(request, template, user, status=400, error=str(exc), rows=[], form={},
                              page=1, more=False, links={}, choices={}, index=None)  # fmt: skip
    state = await console.index.refresh()
    found = await console.index.search(query)
    more = len(found) > views.PAGE
    choices = {} if fragment else {name: await console.index.values(name)
                                   for name in ("agent", "tool", "group", "policy_version")}  # fmt: skip
    return console.render(
        request, template, user,
        rows=views.rows(found[: views.PAGE]),
        form=views.form_values(query),
        page=page,
        more=more,
        links={"next": views.link_for(query, page=page + 1), "prev": views.link_for(query, page=page - 1)},
        choices=choices,
        decisions=views.DECISIONS,
        stages=views.STAGES,
        outcomes=("ok", "error", "interrupted", "unfinished"),
        index=state,
        error=None,
    )  # fmt: skip


def _shipped(conn: sqlite3.Connection, call_id: str) -> float | None:
    row = conn.execute(
        "SELECT MAX(shipped_at), COUNT(*) - COUNT(shipped_at) FROM outbox WHERE call_id = ?", (call_id,)
    ).fetchone()
    return float(row[0]) if row and row[0] is not None and row[1] == 0 else None


async def call_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    call_id = request.path_params["call_id"]
    if console.index is None:
        return console.render(request, "unavailable.html", user, status=501, what="This audit backend has no search.")

    def read(conn: sqlite3.Connection) -> tuple[dict[str, Any] | None, float | None]:
        return show(conn, call_id), _shipped(conn, call_id)

    record, shipped_at = await console.index.run(read)
    if record is None or "decision" not in record:
        return console.render(request, "not_found.html", user, status=404, what=f"No call {call_id} in the audit log.")
    record = console.redactor.apply(record)  # records kept from before a detector existed are redacted too
    decision = record["decision"]
    outcome = record.get("outcome")
    document, recorded = views.decision_input(decision)
    trace_id = trace_id_for(call_id)
    return console.render(
        request, "audit/call.html", user,
        call_id=call_id,
        decision=decision,
        outcome=outcome,
        outcome_label=views.outcome_of({"decision": decision.get("decision"), "outcome_seq": 1 if outcome else None,
                                        "is_error": (outcome or {}).get("is_error"),
                                        "interrupted": (outcome or {}).get("interrupted")}),
        decision_input=json.dumps(document, indent=2, default=str),
        input_recorded=recorded,
        obligations=json.dumps(decision.get("obligations") or {}, indent=2, default=str),
        arguments=json.dumps(decision.get("arguments"), indent=2, default=str),
        timings=views.stage_timings(record),
        trace_id=trace_id,
        trace_url=await trace_url(console, trace_id) if shipped_at else None,
        shipped_at=views.when(shipped_at),
        raw=json.dumps(record, indent=2, default=str),
    )  # fmt: skip


async def run_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    run_id = request.path_params["run_id"]
    if console.index is None:
        return console.render(request, "unavailable.html", user, status=501, what="This audit backend has no search.")
    await console.index.refresh()
    found = await console.index.run_calls(run_id)
    spans, length_ms = views.timeline(found)
    return console.render(
        request, "audit/run.html", user, run_id=run_id, spans=spans, length_ms=length_ms,
        llm=sum(1 for s in spans if s.row.action == "llm"), denied=sum(1 for s in spans if s.row.decision != "allow"),
    )  # fmt: skip


async def chain_page(request: Request) -> Response:
    console = console_of(request)
    user = await console.require(request)
    if console.chain is None:
        return console.render(request, "unavailable.html", user, status=501,
                              what="This audit backend has no hash chain to verify.")  # fmt: skip
    return console.render(request, "audit/chain.html", user, status_=console.chain.last,
                          checkpoint=console.chain.last_checkpoint(), when=views.when)  # fmt: skip


async def chain_verify(request: Request) -> Response:
    """Recompute the whole chain now (a fragment for the chain page; GET: it changes nothing)."""
    console = console_of(request)
    user = await console.require(request)
    if console.chain is None:
        return Response(status_code=501)
    status = await console.chain.verify(0.0 if request.query_params.get("fresh") else 60.0)
    return console.render(request, "audit/_chain_status.html", user, status_=status, when=views.when)


ROUTES = [
    Route("/", home, methods=["GET"]),
    Route("/audit", search_page, methods=["GET"]),
    Route("/audit/calls/{call_id}", call_page, methods=["GET"]),
    Route("/audit/runs/{run_id:path}", run_page, methods=["GET"]),
    Route("/audit/chain", chain_page, methods=["GET"]),
    Route("/audit/chain/verify", chain_verify, methods=["GET"]),
]
