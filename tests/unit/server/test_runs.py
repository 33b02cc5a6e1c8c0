from __future__ import annotations

from server.runs import run_info

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_an_explicit_run_id_in_meta_wins() -> None:
    run = run_info({"io.castellan/runId": "run-42", "traceparent": TRACEPARENT}, {}, fallback="call-1")
    assert (run.run_id, run.traceparent) == ("run-42", TRACEPARENT)


def test_the_trace_id_of_a_traceparent_names_the_run() -> None:
    assert run_info(None, {"traceparent": TRACEPARENT}, fallback="c").run_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_header_run_id_and_depth_are_read() -> None:
    run = run_info({}, {"x-castellan-run-id": "r-7", "x-castellan-run-depth": "2"}, fallback="c")
    assert (run.run_id, run.depth) == ("r-7", 2)


def test_without_any_run_the_call_is_its_own_run() -> None:
    assert run_info(None, None, fallback="call-9").run_id == "call-9"


def test_values_that_are_not_ids_are_ignored() -> None:
    run = run_info({"run_id": "x" * 500, "depth": "-3", "traceparent": "garbage"}, {}, fallback="c")
    assert (run.run_id, run.depth, run.traceparent) == ("c", 0, None)
