"""Decision latency per policy engine option, side by side in one run, for the default policy: the
embedded engine with each evaluator (the OPA library: OPA's own evaluator in-process; regorus, the
fallback without Go), schema validation included, and a real OPA server over loopback (aiohttp,
pooled). Writes bench/results/policy.{json,md}.

    .venv/bin/python -m bench.policy [--decisions 5000]

`--cpu` measures instead what the policy stage costs the gateway's process per call: process CPU
(every thread, the Go runtime's own included) per decision for the stage's work (the input built,
decided, written to the decision log), each evaluator, in child processes interleaved round by round:
`now` (the defaults) beside `before` (the mask evaluated again by the decision log, a write per line,
Go's default collector pacing, GOGC=100). Writes bench/results/policy_cpu.{json,md}.

    .venv/bin/python -m bench.policy --cpu [--decisions 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile
from server.policy import inprocess_opa
from server.policy._input import build_input
from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog
from server.policy.embedded import EmbeddedEngine, default_evaluator
from server.policy.engine import PolicyEngine
from server.policy.opa import OpaServerEngine
from server.settings import REPO_ROOT
from tests.fakes.backends import make_call
from tests.opa import run_opa
from tools.echo import EchoTool

RESULTS = Path(__file__).parent / "results"


async def sequential(engine: PolicyEngine, docs: list[dict[str, Any]]) -> list[float]:
    latencies = []
    for doc in docs:
        started = time.perf_counter()
        decision = await engine.decide(doc)
        latencies.append(time.perf_counter() - started)
        assert decision.allow, decision.reasons
    return latencies


async def concurrent(engine: PolicyEngine, docs: list[dict[str, Any]], concurrency: int) -> float:
    """Decisions per second with `concurrency` callers."""
    queue = list(docs)

    async def worker() -> None:
        while queue:
            await engine.decide(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(docs) / (time.perf_counter() - started)


async def run(decisions: int) -> list[dict[str, Any]]:
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    docs = [
        build_input(make_call(tool=EchoTool(), tool_name="echo", arguments={"text": f"hello {i}"}))
        for i in range(decisions)
    ]
    rows = []
    with run_opa() as opa:
        options: list[tuple[str, PolicyEngine]] = []
        if inprocess_opa.available():
            options.append(("embedded (opa-library)", EmbeddedEngine(bundle, evaluator="opa-library")))
        options.append(("embedded (regorus)", EmbeddedEngine(bundle, evaluator="regorus")))
        options.append(("opa (loopback)", OpaServerEngine(opa.url, bundle=bundle)))
        for _, engine in options:
            await sequential(engine, docs[:500])  # warm-up (and the OPA push)
        for label, engine in options:
            latencies = await sequential(engine, docs)
            rows.append(
                {
                    "engine": label,
                    "decisions": len(latencies),
                    "p50_us": percentile(latencies, 0.5) * 1e6,
                    "p99_us": percentile(latencies, 0.99) * 1e6,
                    "per_second_c16": await concurrent(engine, docs, 16),
                }
            )
        for _, engine in options:
            await engine.close()
    return rows


CONFIGS = ("before", "now")


async def stage_cpu(evaluator: str, config: str, decisions: int) -> float:
    """Process CPU µs per decision for the policy stage's work: build the input, decide, log it."""
    bundle = PolicyBundle.from_directory(REPO_ROOT / "policies")
    now = config == "now"
    engine = EmbeddedEngine(bundle, evaluator=evaluator, log_masks=now)
    with tempfile.TemporaryDirectory() as tmp:
        decision_log = DecisionLog(
            Path(tmp) / "decisions.jsonl", bundle, "castellan/gateway/decision", flush_seconds=1.0 if now else 0
        )
        arguments = [{"text": f"hello {i}"} for i in range(decisions)]
        calls = [make_call(tool=EchoTool(), tool_name="echo", arguments=a) for a in arguments]
        for warm_up in (True, False):
            started = time.process_time()
            for call in calls[:300] if warm_up else calls:
                document = build_input(call)
                decision = await engine.decide(document)
                assert decision.allow, decision.reasons
                decision_log.emit(document, decision)
                await asyncio.sleep(0)  # the loop turns between calls, as in the gateway
        used = time.process_time() - started
        decision_log.close()
    await engine.close()
    return used / decisions * 1e6


def cpu_rows(decisions: int, rounds: int) -> list[dict[str, Any]]:
    evaluators = ["opa-library", "regorus"] if default_evaluator() == "opa-library" else ["regorus"]
    samples: dict[tuple[str, str], list[float]] = {(e, c): [] for e in evaluators for c in CONFIGS}
    for _ in range(rounds):  # interleaved: load drifts between rounds, not between the two configurations
        for evaluator in evaluators:
            for config in CONFIGS:
                env = {**os.environ, **({"GOGC": "100"} if config == "before" else {})}
                child = [sys.executable, "-m", "bench.policy", "--cpu-child", evaluator, config, str(decisions)]
                out = subprocess.run(child, env=env, capture_output=True, text=True, check=True, timeout=600)
                samples[(evaluator, config)].append(float(out.stdout.strip().splitlines()[-1]))
    return [
        {"evaluator": e, "config": c, "us_per_decision": percentile(samples[(e, c)], 0.5), "rounds": samples[(e, c)]}
        for e, c in samples
    ]


def cpu_main(decisions: int, rounds: int) -> None:
    rows = cpu_rows(decisions, rounds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["| evaluator | configuration | process CPU µs per decision (median of rounds) |", "|---|---|---:|"]
    lines += [f"| {r['evaluator']} | {r['config']} | {r['us_per_decision']:.0f} |" for r in rows]
    markdown = "# Policy stage CPU per decision (input, decision, decision log), default policy\n\n"
    markdown += "\n".join(lines) + f"\n\n{decisions} decisions x {rounds} interleaved rounds; load average after"
    markdown += f" the run (1, 5, 15 min): {load} on {os.cpu_count()} cores.\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy_cpu.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "policy_cpu.md").write_text(markdown)
    print(markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=0, help="default: 5000, 2000 with --cpu")
    parser.add_argument("--cpu", action="store_true", help="process CPU per decision, now and before")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu-child", nargs=3, metavar=("EVALUATOR", "CONFIG", "DECISIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_child:
        evaluator, config, count = args.cpu_child
        print(asyncio.run(stage_cpu(evaluator, config, int(count))))
        return
    if args.cpu:
        cpu_main(args.decisions or 2000, args.rounds)
        return
    rows = asyncio.run(run(args.decisions or 5000))
    lines = ["| engine | decisions | p50 µs | p99 µs | decisions/s at concurrency 16 |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['engine']} | {r['decisions']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['per_second_c16']:.0f} |"
        for r in rows
    ]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    markdown = "# Policy decision latency, default policy, one run\n\n" + "\n".join(lines) + "\n"
    markdown += f"\nLoad average after the run (1, 5, 15 min): {load} on {os.cpu_count()} cores.\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "policy.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
