"""`castellan-agent`: ask a question through the gateway, or evaluate the agent on a golden dataset."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from agent_client.agent import Agent, AgentResult
from agent_client.gateway import Observation, connect
from agent_client.models import ChatModel, OpenAICompatibleModel, ScriptedModel
from agent_client.settings import AgentSettings

GOLDEN = Path(__file__).parent / "golden" / "demo.jsonl"


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
    except (ValueError, KeyError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write per-case results.")
def evaluate(dataset: Path, model_kind: str, threshold: float, use_mlflow: bool, json_out: Path | None) -> None:
    """Run every case of DATASET (default: the demo golden set) and score the agent; exit 1 under threshold."""
    from agent_client.evaluation import failures, load_cases, log_to_mlflow, summarize, table

    settings = AgentSettings()
    try:
        cases = load_cases(dataset)
        rows = asyncio.run(_run_cases(settings, cases, model_kind))
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    means = summarize(rows)
    click.echo(table(rows, means))
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=2, default=str))
    if use_mlflow:
        uri = settings.mlflow_tracking_uri or f"sqlite:///{Path('.castellan/mlflow.db').resolve()}"
        Path(".castellan").mkdir(exist_ok=True)
        run_id = log_to_mlflow(rows, uri, settings.mlflow_experiment)
        click.echo(f"logged to MLflow ({uri}), experiment {settings.mlflow_experiment}, run {run_id}")
    failed = failures(means, threshold)
    if failed:
        click.echo("FAILED: " + "; ".join(failed), err=True)
        sys.exit(1)
    click.echo(f"passed: every metric ≥ {threshold:.2f}, policy compliance 1.00")


async def _run_cases(settings: AgentSettings, cases: list[Any], model_kind: str) -> list[dict[str, Any]]:
    from agent_client.evaluation import score
    from agent_client.judge import judge

    judge_model = (
        OpenAICompatibleModel(settings.judge_base_url, settings.judge_api_key, settings.judge_model)
        if settings.judge_base_url
        else None
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
                     "expectations": case.expectations, "scores": scores})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
