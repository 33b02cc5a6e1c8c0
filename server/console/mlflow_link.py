"""The link from a call to its trace in the MLflow UI (the trace id is derived from the call id)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
import structlog

if TYPE_CHECKING:
    from server.console.context import Console

log = structlog.get_logger("castellan.console")


async def experiment_id(console: Console) -> str | None:
    """The audit experiment's id on the MLflow server (asked once, by REST; None when it cannot say)."""
    if console.mlflow_experiment_id is not None:
        return console.mlflow_experiment_id
    if not console.mlflow_ui_url:
        return None
    name = console.gateway.settings.audit.mlflow_experiment
    url = f"{console.mlflow_ui_url}/api/2.0/mlflow/experiments/get-by-name"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(url, params={"experiment_name": name}) as resp,
        ):
            if resp.status != 200:
                return None
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.info("console_mlflow_unreachable", url=console.mlflow_ui_url, error=str(exc))
        return None
    found = (body.get("experiment") or {}).get("experiment_id")
    console.mlflow_experiment_id = str(found) if found else None
    return console.mlflow_experiment_id


async def trace_url(console: Console, trace_id: str) -> str | None:
    experiment = await experiment_id(console)
    if experiment is None:
        return None
    return f"{console.mlflow_ui_url}/#/experiments/{quote(experiment)}/traces?selectedEvaluationId={quote(trace_id)}"
