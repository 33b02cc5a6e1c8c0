"""Content guardrails and shadow policy, measured in one run. Writes bench/results/guardrails.{json,md}.

1. Quality: precision and recall per kind on the labelled synthetic sample set
   (tests/data/guardrails/samples.jsonl), for the gateway's detectors and, given
   `--presidio-python` (a Python with presidio-analyzer installed, which the project does not depend
   on), for Presidio's analyzer recognizers without an NLP engine (no spaCy model can be downloaded
   here): the same samples, scored the same way.
2. Cost per call: scanning typical arguments (~300 B), a typical result (~2 KB of JSON rows) and
   100 KB payloads (JSON rows full of personal data; log text with none), against the baseline the
   gateway already pays on the same payload in the same run: the audit redactor's secret scan.
   Presidio's recognizers on the same texts when given.
3. Shadow policy: the policy stage's decision with and without a shadow policy (both the shipped
   default, in-process), so the time a shadow adds to a call is measured, not assumed.

    .venv/bin/python -m bench.guardrails [--rounds 200] [--presidio-python /tmp/presidio/bin/python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent

# Presidio entity → the gateway's kind (only those Presidio's pattern recognizers cover).
PRESIDIO_KINDS = {
    "EMAIL_ADDRESS": "email",
    "PHONE_NUMBER": "phone",
    "CREDIT_CARD": "card_number",
    "IBAN_CODE": "iban",
    "US_SSN": "national_id",
    "UK_NHS": "national_id",
    "ES_NIF": "national_id",
    "ES_NIE": "national_id",
    "IT_FISCAL_CODE": "national_id",
    "DE_TAX_ID": "national_id",
    "FR_NIR": "national_id",
    "NL_BSN": "national_id",
}


def varied(row: dict[str, Any], i: int) -> dict[str, Any]:
    """`row` made different for each `i` (no two rows share a value, so no cache flatters the scan)."""
    return {
        **row,
        "id": i,
        "full_name": f"{row['full_name']} {i}",
        "email": f"user{i}@example.org",
        "phone": f"+44 20 7946 {i % 10_000:04d}",
        "card": "4111 1111 1111 1111" if i % 2 else f"5555 5555 5555 {4444 + i % 5000:04d}",
        "note": f"{row['note']} Order {100_000 + i}.",
    }


def payloads() -> dict[str, tuple[dict[str, Any], str]]:
    """name → (JSON value, as text)."""
    typical_args = {
        "question": "Which orders did jane.doe@example.com place last week, and were any refunded?",
        "limit": 20,
        "filters": {"region": "EMEA", "status": ["open", "refunded"], "since": "2026-11-23"},
    }
    row = {
        "id": 0,
        "full_name": "Amelia Varga",
        "email": "amelia.varga@example.org",
        "phone": "+44 20 7946 0958",
        "card": "4111 1111 1111 1111",
        "note": "Prefers email; renewal due in March. Ticket 5512 closed.",
    }
    typical_result = {"rows": [varied(row, i) for i in range(10)]}
    big_rows = {"rows": [varied(row, i) for i in range(100_000 // len(json.dumps(row)))]}
    log_line = "2026-11-23T12:00:00Z INFO worker-3 processed batch 88231 in 412 ms (rows=5000, retries=0)\n"
    big_log = {"text": log_line * (100_000 // len(log_line))}
    values = {
        "typical arguments": typical_args,
        "typical result (10 rows)": typical_result,
        "100 KB result (rows of personal data)": big_rows,
        "100 KB result (log text, nothing to find)": big_log,
    }
    return {name: (value, json.dumps(value)) for name, value in values.items()}


def timed(fn: Callable[[], object], rounds: int) -> float:
    """Mean microseconds per call over `rounds` (after one warm-up call)."""
    fn()
    started = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - started) / rounds * 1e6


def gateway_quality() -> dict[str, Any]:
    from server.guardrails.detectors import Detector
    from tests.data.guardrails.quality import evaluate, totals

    detector = Detector()
    scores = evaluate(lambda text, field: [(f.kind, f.start, f.end) for f in detector.find(text, field)])
    return _scores_json(scores, totals(scores))


def _scores_json(scores: dict[str, Any], total: Any) -> dict[str, Any]:
    return {
        "kinds": {
            kind: {"tp": s.tp, "fp": s.fp, "fn": s.fn, "precision": round(s.precision, 3), "recall": round(s.recall, 3),
                   "false_positives": s.false_positives[:5], "misses": s.misses[:5]}
            for kind, s in sorted(scores.items())
        },
        "total": {"tp": total.tp, "fp": total.fp, "fn": total.fn, "precision": round(total.precision, 3),
                  "recall": round(total.recall, 3)},
    }  # fmt: skip


def gateway_cost(rounds: int) -> list[dict[str, Any]]:
    from server.audit.redaction import Redactor
    from server.guardrails import detectors
    from server.guardrails.detectors import Detector
    from server.guardrails.scan import scan_arguments, scan_result
    from server.registry import ToolOutput

    redactor = Redactor()
    detector = Detector(redactor.scanner)

    def forget() -> None:
        """Every cache emptied: each round sees its values for the first time (the usual case)."""
        detector._short.cache_clear()
        detectors._phone_region.cache_clear()
        redactor.scanner._short.cache_clear()

    rows = []
    for name, (value, text) in payloads().items():
        n = rounds if len(text) < 10_000 else max(5, rounds // 20)
        output = ToolOutput(text=text, structured=value)

        def scan(
            value: dict[str, Any] = value, output: ToolOutput = output, arguments: bool = name == "typical arguments"
        ) -> object:
            forget()
            return scan_arguments(value, detector) if arguments else scan_result(output, detector)

        guard = timed(scan, n)
        baseline = timed(lambda v=value: (forget(), redactor.apply(v)), n)
        rows.append({"payload": name, "bytes": len(text), "rounds": n, "guardrails_us": round(guard, 1),
                     "baseline_redactor_us": round(baseline, 1)})  # fmt: skip
    return rows


async def shadow_cost(rounds: int) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from server.policy.bundle import PolicyBundle
    from server.policy.embedded import EmbeddedEngine
    from server.policy.shadow import ShadowPolicy, ShadowStage
    from server.policy.stage import PolicyStage
    from server.settings import REPO_ROOT
    from tests.fakes.backends import make_call
    from tools.echo import EchoTool

    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    live = EmbeddedEngine(bundle)
    candidate = EmbeddedEngine(bundle)
    plain = PolicyStage(live)
    shadow = ShadowPolicy(candidate, 1.0, CollectorRegistry())
    shadowed = PolicyStage(live, shadow=shadow)
    collect = ShadowStage(1.0)
    call = make_call(tool=EchoTool(), tool_name="echo", arguments={"text": "hello"})

    async def response_path(stage: PolicyStage) -> None:
        decided = await stage.run(call)
        assert decided.allowed
        if decided.shadow_pending is not None:  # left running, as the call's record write and tool run
            await asyncio.sleep(0)  # the loop gets to it while this call waits on I/O
            await decided.shadow_pending

    async def whole(stage: PolicyStage) -> None:
        await collect.run(await stage.run(call))

    async def mean(run: Any, stage: PolicyStage, measure_stage_only: bool) -> float:
        for _ in range(50):
            await run(stage)
        spent = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            decided = await stage.run(call)
            spent += time.perf_counter() - started
            if measure_stage_only:
                if decided.shadow_pending is not None:
                    await decided.shadow_pending
            else:
                started = time.perf_counter()
                await collect.run(decided)
                spent += time.perf_counter() - started
        return spent / rounds * 1e6

    # Interleaved, four times each, so machine load drifts over all alike; the best of the four kept.
    results: dict[str, list[float]] = {"live": [], "live+shadow, response path": [], "live+shadow, all work": []}
    for _ in range(4):
        results["live"].append(await mean(whole, plain, True))
        results["live+shadow, response path"].append(await mean(response_path, shadowed, True))
        results["live+shadow, all work"].append(await mean(whole, shadowed, False))
    await shadow.close()
    await live.close()
    best = {k: min(v) for k, v in results.items()}
    return {"rounds": rounds, "policy_stage_us": {k: round(v, 1) for k, v in best.items()}}


def presidio_worker(rounds: int) -> None:
    """Run by the Presidio Python: its pattern recognizers, no NLP engine; prints JSON."""
    import io
    import logging

    logging.disable(logging.CRITICAL)  # tldextract's failed download of the suffix list is logged at length
    started = time.perf_counter()
    from presidio_analyzer import predefined_recognizers as rec

    import_s = time.perf_counter() - started
    names = ["EmailRecognizer", "PhoneRecognizer", "CreditCardRecognizer", "IbanRecognizer", "UsSsnRecognizer"]
    names += ["NhsRecognizer", "EsNifRecognizer", "EsNieRecognizer", "ItFiscalCodeRecognizer", "DeTaxIdRecognizer"]
    recognizers = [getattr(rec, n)() for n in names if hasattr(rec, n)]
    stderr, sys.stderr = sys.stderr, io.StringIO()

    def find(text: str, field: str = "") -> list[tuple[str, int, int]]:
        out = []
        for recognizer in recognizers:
            for r in recognizer.analyze(text, recognizer.supported_entities, None):
                if r.entity_type in PRESIDIO_KINDS:
                    out.append((PRESIDIO_KINDS[r.entity_type], r.start, r.end))
        return out

    from tests.data.guardrails.quality import evaluate, totals

    scores = evaluate(find, set(PRESIDIO_KINDS.values()))
    sys.stderr = stderr
    cost = []
    for name, (_value, text) in payloads().items():
        n = rounds if len(text) < 10_000 else max(3, rounds // 50)
        cost.append({"payload": name, "rounds": n, "presidio_us": round(timed(lambda t=text: find(t), n), 1)})
    import presidio_analyzer

    site = Path(presidio_analyzer.__file__).parent.parent
    report = {"quality": _scores_json(scores, totals(scores)), "cost": cost, "import_seconds": round(import_s, 2)}
    report |= {"recognizers": [type(r).__name__ for r in recognizers], "site_packages_mb": _mb(site)}
    print(json.dumps(report))


def _mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return round(total / 1e6, 1)


def install_size() -> dict[str, float]:
    import phonenumbers
    import stdnum

    return {
        "python-stdnum": _mb(Path(stdnum.__file__).parent),
        "phonenumberslite": _mb(Path(phonenumbers.__file__).parent),
    }


def render(report: dict[str, Any]) -> str:
    lines = ["# Content guardrails and shadow policy, one run", ""]
    lines += ["## Quality on the labelled synthetic sample set (tests/data/guardrails/samples.jsonl)", ""]
    presidio = report.get("presidio", {}).get("quality", {}).get("kinds", {})
    lines += ["| kind | gateway precision | gateway recall | Presidio precision | Presidio recall |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for kind, s in report["quality"]["kinds"].items():
        p = presidio.get(kind)
        theirs = f"{p['precision']:.3f} | {p['recall']:.3f}" if p else "— | —"
        lines.append(f"| {kind} | {s['precision']:.3f} | {s['recall']:.3f} | {theirs} |")
    total = report["quality"]["total"]
    theirs_total = report["presidio"]["quality"]["total"] if presidio else None
    their_cells = f"{theirs_total['precision']:.3f} | {theirs_total['recall']:.3f} |" if theirs_total else "— | — |"
    lines.append(f"| **all** | {total['precision']:.3f} | {total['recall']:.3f} | {their_cells}")
    if presidio:
        lines += ["", "Presidio is scored only on the kinds its pattern recognizers cover (it has no secret, "
                  "name or address detector without an NLP model)."]  # fmt: skip
    lines += ["", "## Cost per call (mean µs, every cache emptied before each round)", ""]
    lines += ["| payload | bytes | guardrails | baseline: audit redactor on the same payload | Presidio recognizers |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    theirs_cost = {c["payload"]: c["presidio_us"] for c in report.get("presidio", {}).get("cost", [])}
    for row in report["cost"]:
        other = f"{theirs_cost[row['payload']]:,.0f}" if row["payload"] in theirs_cost else "—"
        lines.append(f"| {row['payload']} | {row['bytes']:,} | {row['guardrails_us']:,.0f} | "
                     f"{row['baseline_redactor_us']:,.0f} | {other} |")  # fmt: skip
    shadow = report["shadow"]
    lines += ["", "## Shadow policy (the default policy as live and as candidate, in-process)", "",
              f"Mean µs per allowed call over {shadow['rounds']} (best of four interleaved runs):", "",
              "| | µs |", "|---|---:|"]  # fmt: skip
    lines += [f"| {what} | {us:.0f} |" for what, us in shadow["policy_stage_us"].items()]
    lines += ["", "The response path is the policy stage (the live decision, then the shadow's task started); "
              "all work adds the shadow's decision, made beside the call while its record is written and its "
              "tool runs, and collected before the outcome write."]  # fmt: skip
    sizes = report["install_mb"]
    lines += ["", "## Install size", "",
              f"Gateway detectors: python-stdnum {sizes['python-stdnum']} MB + phonenumberslite "
              f"{sizes['phonenumberslite']} MB (detect-secrets and google-re2 were already dependencies)."]  # fmt: skip
    if "presidio" in report:
        p = report["presidio"]
        lines.append(f"Presidio: its Python's site-packages {p['site_packages_mb']} MB (spaCy, thinc, numpy, "
                     f"tldextract...); importing its recognizers took {p['import_seconds']} s.")  # fmt: skip
    load = report["load_average"]
    lines += ["", f"Load average after the run (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} on "
              f"{os.cpu_count()} cores."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--presidio-python", help="A Python with presidio-analyzer installed (compared when given).")
    parser.add_argument("--presidio-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.presidio_worker:
        presidio_worker(args.rounds)
        return
    report: dict[str, Any] = {
        "quality": gateway_quality(),
        "cost": gateway_cost(args.rounds),
        "shadow": asyncio.run(shadow_cost(args.rounds * 5)),
        "install_mb": install_size(),
    }
    if args.presidio_python:
        done = subprocess.run(
            [args.presidio_python, "-m", "bench.guardrails", "--presidio-worker", "--rounds", str(args.rounds)],
            cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        report["presidio"] = json.loads(done.stdout.strip().splitlines()[-1])
    report["load_average"] = list(os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "guardrails.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "guardrails.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
