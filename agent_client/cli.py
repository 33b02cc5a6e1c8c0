"""`castellan-agent`: ask a question through the gateway, or evaluate the agent on a golden dataset."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click

from agent_client.agent import Agent, AgentResult
from agent_client.gateway import Observation, connect
from agent_client.models import ChatModel, ModelError, OpenAICompatibleModel, ScriptedModel
from agent_client.settings import AgentSettings
from server.audit.mlflow_target import local_tracking_uri

GOLDEN = Path(__file__).parent / "golden" / "demo.jsonl"
HARNESS_NOTE = (
    "note: the scripted model replays each case's own plan: this checks the harness, the scorers and the "
    "gateway's decisions, not an agent's judgement (use --model llm to measure an agent)"
)


def one_line(settings: AgentSettings, exc: BaseException) -> str:
    """What went wrong, in one line (the innermost cause of an exception group), with what to do about it."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ModelError):
        if not settings.llm_base_url and "not configured" in text:
            return (
                "no model: the gateway's LLM route is not configured; set llm.upstream_url on the gateway, or "
                "CASTELLAN_AGENT_LLM_BASE_URL (an OpenAI-compatible API), or pass --script PLAN for a scripted run"
            )
        return text
    if isinstance(exc, OSError | aiohttp.ClientError) or "connect" in text.lower():
        text += f" (is the gateway running at {settings.gateway_url}? see CASTELLAN_AGENT_GATEWAY_URL)"
    return text


def _model(
    settings: AgentSettings, script: dict[str, Any] | None, script_file: Path | None, question: str
) -> ChatModel:
    if script is not None:
        return ScriptedModel(script)
    if script_file is not None:
        return ScriptedModel.from_file(script_file, question)
    return OpenAICompatibleModel(
        settings.llm_base(), settings.llm_api_key or settings.bearer(), settings.model, settings.timeout_seconds
    )


def _print_step(step: Observation) -> None:
    verdict = "allowed" if not step.denied else f"DENIED at {step.stage}"
    arguments = json.dumps(step.arguments)[:120]
    click.echo(f"  → {step.tool} {arguments}  [{verdict}, {step.latency_ms:.0f} ms]")
    if step.denied:
        for reason in step.reasons:
            click.echo(f"      reason: {reason}")
    elif not step.ok:
        click.echo(f"      tool error: {step.text[:200]}")


async def run_question(settings: AgentSettings, question: str, model: ChatModel, verbose: bool = True) -> AgentResult:
    async with connect(settings.gateway_url, settings.bearer(), settings.protocol) as session:
        agent = Agent(session, model, settings.max_steps, on_step=_print_step if verbose else None)
        return await agent.run(question)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The Castellan reference agent. Configure with CASTELLAN_AGENT_* (gateway URL, token, model)."""


@main.command()
@click.argument("question")
@click.option("--script", "script_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use the scripted model (a plan of tool calls from this file) instead of an LLM.")  # fmt: skip
def ask(question: str, script_file: Path | None) -> None:
    """Answer QUESTION with the gateway's tools, printing each step as it happens."""
    settings = AgentSettings()
    try:
        model = _model(settings, None, script_file, question)
        click.echo(f"question: {question}  (model: {model.name})")
        result = asyncio.run(run_question(settings, question, model))
    except Exception as exc:  # the user gets one line, never a traceback
        raise click.ClickException(one_line(settings, exc)) from None
    click.echo(f"answer: {result.answer}")
    click.echo(f"stopped: {result.stop_reason}; run {result.run_id}; {len(result.steps)} tool call(s)")
    sys.exit(0 if result.stop_reason == "answer" else 2)


@main.command("eval")
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=str(GOLDEN))
@click.option("--model", "model_kind", type=click.Choice(["scripted", "llm"]), default="scripted", show_default=True,
              help="scripted: each case's own plan (offline); llm: the configured endpoint.")  # fmt: skip
@click.option("--threshold", type=float, default=0.8, show_default=True,
              help="Minimum mean per metric (policy compliance must always be 1.0).")  # fmt: skip
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, help="Log with mlflow.genai.evaluate.")
@click.option("--judge/--no-judge", "use_judge", default=False,
              help="Grade answers with an LLM judge (JUDGE_BASE_URL, else the gateway's LLM route).")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write per-case results.")
def evaluate(
    dataset: Path, model_kind: str, threshold: float, use_mlflow: bool, use_judge: bool, json_out: Path | None
) -> None:
    """Run every case of DATASET (default: the demo golden set) and score the agent; exit 1 under threshold.

    Cases with `lowers` play a deliberate mistake (see golden/mistakes.jsonl): the run fails unless each
    named metric dropped, which shows the scorers catch that kind of mistake."""
    from agent_client.evaluation import failures, load_cases, log_to_mlflow, summarize, table, uncaught_mistakes

    settings = AgentSettings()
    try:
        cases = load_cases(dataset)
        if model_kind == "scripted":
            click.echo(HARNESS_NOTE)
        rows = asyncio.run(_run_cases(settings, cases, model_kind, use_judge))
    except Exception as exc:
        raise click.ClickException(one_line(settings, exc)) from None
    means = summarize(rows)
    click.echo(table(rows, means))
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2, default=str))
    if use_mlflow:
        data_dir = Path(os.environ.get("CASTELLAN_DATA_DIR", ".castellan"))  # the gateway's own local store
        uri = settings.mlflow_tracking_uri or local_tracking_uri(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        run_id = log_to_mlflow(rows, uri, settings.mlflow_experiment)
        click.echo(f"logged to MLflow ({uri}), experiment {settings.mlflow_experiment}, run {run_id}")
    if any(r.get("lowers") for r in rows):  # a set of deliberate mistakes: each must be caught
        uncaught = uncaught_mistakes(rows)
        if uncaught:
            click.echo("FAILED: the scorers missed: " + "; ".join(uncaught), err=True)
            sys.exit(1)
        click.echo("passed: every deliberate mistake lowered the metrics it should")
        return
    failed = failures(means, threshold)
    if failed:
        click.echo("FAILED: " + "; ".join(failed), err=True)
        sys.exit(1)
    click.echo(f"passed: every metric ≥ {threshold:.2f}, policy compliance 1.00")


async def _run_cases(
    settings: AgentSettings, cases: list[Any], model_kind: str, use_judge: bool = False
) -> list[dict[str, Any]]:
    from agent_client.evaluation import score
    from agent_client.judge import judge

    judge_model = None
    if use_judge or settings.judge_base_url:  # by default through the gateway's metered, audited LLM route
        judge_model = OpenAICompatibleModel(
            settings.judge_base_url or settings.llm_base(),
            settings.judge_api_key or settings.bearer(),
            settings.judge_model,
        )
    rows = []
    for case in cases:
        if model_kind == "scripted" and case.script is None:
            raise ValueError(f"case {case.id} has no script for the scripted model")
        model = _model(settings, case.script if model_kind == "scripted" else None, None, case.question)
        click.echo(f"[{case.id}] {case.question}")
        result = await run_question(settings, case.question, model)
        outputs = {"answer": result.answer, "calls": result.calls, "stop_reason": result.stop_reason}
        scores = score(outputs, case.expectations)
        if judge_model is not None:
            facts = case.expectations.get("expected_facts") or []
            scores["judge"] = await judge(judge_model, case.question, result.answer or "", facts)
        click.echo(f"  answer: {result.answer}")
        rows.append({"id": case.id, "question": case.question, "answer": result.answer,
                     "stop_reason": result.stop_reason, "calls": result.calls, "run_id": result.run_id,
                     "expectations": case.expectations, "scores": scores,
                     **({"lowers": list(case.lowers)} if case.lowers else {})})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
