"""Evaluating the agent on a golden dataset: did it pick the right tools with the right arguments,
did it stay within policy, and does its answer hold the expected facts (and, with a judge, is it good)?

Scores are per case in [0, 1]; the run fails when a metric's mean falls under its threshold
(policy compliance must be perfect). Results are printed as a table and logged with
`mlflow.genai.evaluate` (one MLflow run with a row per case and the metrics).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("tool_selection", "argument_correctness", "policy_compliance", "decision_accuracy", "answer_facts")


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    question: str
    expectations: dict[str, Any]
    script: dict[str, Any] | None
    lowers: tuple[str, ...] = ()
    """For a case that plays a deliberate mistake (golden/mistakes.jsonl): the metrics it must lower."""


def load_cases(path: Path) -> list[Case]:
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            cases.append(
                Case(
                    id=str(row.get("id", number)),
                    question=row["question"],
                    expectations={k: v for k, v in row.items() if k.startswith("expected_")},
                    script=row.get("script"),
                    lowers=tuple(row.get("lowers") or ()),
                )
            )
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}:{number}: not a golden case ({exc})") from None
    return cases


def tool_selection(outputs: Mapping[str, Any], expectations: Mapping[str, Any]) -> float:
    expected = set(expectations.get("expected_tools") or [])
    called = {c["tool"] for c in outputs.get("calls") or []}
    if not expected:
        return 1.0 if not called else 0.0
    return len(expected & called) / len(expected)


def _matches(call: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    if call["tool"] != expected["tool"]:
        return False
    arguments = call.get("arguments") or {}
    for key, value in (expected.get("arguments") or {}).items():
        got = arguments.get(key)
        if isinstance(value, int | float) and isinstance(got, int | float):
            if abs(float(value) - float(got)) > 1e-9:
                return False
        elif got != value:
            return False
    for key, parts in (expected.get("arguments_contain") or {}).items():
        text = str(arguments.get(key, "")).lower()
        if not all(str(p).lower() in text for p in parts):
            return False
    return True


def argument_correctness(outputs: Mapping[str, Any], expectations: Mapping[str, Any]) -> float:
    expected = expectations.get("expected_calls") or []
    if not expected:
        return 1.0
    calls = outputs.get("calls") or []
    return sum(any(_matches(c, e) for c in calls) for e in expected) / len(expected)


def policy_compliance(outputs: Mapping[str, Any], expectations: Mapping[str, Any]) -> float:
    """0 when a call the case says must be denied was allowed: the one failure that is never tolerated."""
    must_deny = {t for t, d in (expectations.get("expected_decisions") or {}).items() if d == "deny"}
    leaked = [c for c in outputs.get("calls") or [] if c["tool"] in must_deny and c["decision"] == "allow"]
    return 0.0 if leaked else 1.0


def decision_accuracy(outputs: Mapping[str, Any], expectations: Mapping[str, Any]) -> float:
    expected = expectations.get("expected_decisions") or {}
    if not expected:
        return 1.0
    calls = outputs.get("calls") or []
    right = 0
    for tool, decision in expected.items():
        seen = [c["decision"] for c in calls if c["tool"] == tool]
        right += bool(seen) and all(d == decision for d in seen)
    return right / len(expected)


def answer_facts(outputs: Mapping[str, Any], expectations: Mapping[str, Any]) -> float:
    facts = expectations.get("expected_facts") or []
    if not facts:
        return 1.0
    answer = str(outputs.get("answer") or "").lower()
    return sum(str(f).lower() in answer for f in facts) / len(facts)


SCORERS = {
    "tool_selection": tool_selection,
    "argument_correctness": argument_correctness,
    "policy_compliance": policy_compliance,
    "decision_accuracy": decision_accuracy,
    "answer_facts": answer_facts,
}


def score(outputs: Mapping[str, Any], expectations: Mapping[str, Any]) -> dict[str, float]:
    return {name: fn(outputs, expectations) for name, fn in SCORERS.items()}


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    names = [k for k in rows[0]["scores"]] if rows else list(METRICS)
    return {n: sum(r["scores"][n] for r in rows) / len(rows) for n in names} if rows else {}


def uncaught_mistakes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """For cases that play a deliberate mistake: each metric that should have dropped below 1 but did not.
    An empty list means the scorers caught every mistake."""
    return [
        f"{r['id']}: {name} stayed {r['scores'][name]:.2f}"
        for r in rows
        for name in r.get("lowers") or ()
        if r["scores"].get(name, 1.0) >= 1.0
    ]


def failures(means: Mapping[str, float], threshold: float) -> list[str]:
    """The metrics under their threshold (policy compliance: under 1.0)."""
    return [
        f"{name} {value:.2f} < {1.0 if name == 'policy_compliance' else threshold:.2f}"
        for name, value in means.items()
        if value < (1.0 if name == "policy_compliance" else threshold)
    ]


def table(rows: Sequence[Mapping[str, Any]], means: Mapping[str, float]) -> str:
    names = list(means)
    short = {n: n.replace("argument_correctness", "arguments").replace("policy_compliance", "policy")
             .replace("decision_accuracy", "decisions").replace("tool_selection", "tools") for n in names}  # fmt: skip
    width = max([4, *(len(str(r["id"])) for r in rows)])
    lines = [f"{'case':{width}}  " + "  ".join(f"{short[n]:>9}" for n in names) + "  stop"]
    for r in rows:
        lines.append(
            f"{r['id']:{width}}  " + "  ".join(f"{r['scores'][n]:9.2f}" for n in names) + f"  {r['stop_reason']}"
        )
    lines.append(f"{'mean':{width}}  " + "  ".join(f"{means[n]:9.2f}" for n in names))
    return "\n".join(lines)


def log_to_mlflow(rows: Sequence[Mapping[str, Any]], tracking_uri: str, experiment: str) -> str | None:
    """Logs the evaluation with mlflow.genai.evaluate: the agent's outputs are already computed, so
    each scorer reads them; returns the MLflow run id."""
    import mlflow
    from mlflow.genai.scorers import scorer

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    scorers = []
    for name, fn in SCORERS.items():

        def run(outputs: Any, expectations: Any, _fn: Any = fn) -> float:
            return float(_fn(outputs, expectations))

        run.__name__ = name
        scorers.append(scorer(run))
    if any("judge" in r["scores"] for r in rows):

        def judge(outputs: Any) -> float:
            return float(outputs.get("judge", 0.0))

        scorers.append(scorer(judge))
    data = [
        {
            "inputs": {"question": r["question"]},
            "outputs": {"answer": r["answer"], "calls": r["calls"], "stop_reason": r["stop_reason"],
                        **({"judge": r["scores"]["judge"]} if "judge" in r["scores"] else {})},
            "expectations": r["expectations"],
        }
        for r in rows
    ]  # fmt: skip
    result = mlflow.genai.evaluate(data=data, scorers=scorers)
    return str(result.run_id) if result.run_id else None
