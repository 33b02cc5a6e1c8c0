"""Loading a policy version into a real OPA: verified in that OPA before it decides, labelled with the
revision OPA evaluated, restored when something else changed what OPA holds, and retried (not
refused) when OPA cannot be reached."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.errors import BackendUnavailable
from server.policy._input import build_input
from server.policy.bundle import PolicyBundle
from server.policy.opa import OpaServerEngine
from server.settings import REPO_ROOT
from tests.fakes.backends import make_call
from tests.opa import run_opa
from tools.echo import EchoTool

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def doc(text: str = "hi") -> dict[str, Any]:
    return build_input(make_call(tool=EchoTool(), tool_name="echo", arguments={"text": text}))


def edited(tmp_path: Path, name: str, extra_rule: str) -> PolicyBundle:
    root = tmp_path / name
    shutil.copytree(REPO_ROOT / "policies", root)
    rego = root / "castellan" / "gateway.rego"
    rego.write_text(rego.read_text() + "\n" + extra_rule + "\n")
    return PolicyBundle.from_directory(root)


def module_ids(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/policies") as resp:
        return [p["id"] for p in json.loads(resp.read())["result"]]


async def test_an_ill_typed_version_is_refused_by_the_opa_that_would_serve_it(tmp_path: Path) -> None:
    good = PolicyBundle.from_directory(REPO_ROOT / "policies")
    with run_opa() as opa:
        engine = OpaServerEngine(opa.url, bundle=good)
        try:
            assert (await engine.decide(doc())).policy_version == good.version
            report = await engine.load(edited(tmp_path, "bad", 'deny contains 42 if input.action == "call"'))
            assert not report.loaded
            assert "probe 'plain call': policy decision 'reasons' is not a set of strings" in report.errors
            decision = await engine.decide(doc())
            assert (decision.allow, decision.policy_version) == (True, good.version)
            assert not [m for m in module_ids(opa.url) if m.startswith("castellan-tests/")]  # tests cleaned up
        finally:
            await engine.close()


async def test_a_version_mixed_by_another_writer_is_restored_before_deciding(tmp_path: Path) -> None:
    good = PolicyBundle.from_directory(REPO_ROOT / "policies")
    with run_opa() as opa:
        engine = OpaServerEngine(opa.url, bundle=good)
        try:
            await engine.decide(doc())
            # Someone else replaces the data (and with it the revision the runtime module checks).
            async with aiohttp.ClientSession() as session, session.put(f"{opa.url}/v1/data", json={"castellan": {}}):
                pass
            decision = await engine.decide(doc("x" * 201))
            assert decision.reasons == ("argument text must be a string of at most 200 characters",)
            assert decision.policy_version == good.version
            assert engine.repushes == 1
        finally:
            await engine.close()


async def test_a_load_while_opa_is_down_is_no_verdict_and_succeeds_once_it_is_back(tmp_path: Path) -> None:
    good = PolicyBundle.from_directory(REPO_ROOT / "policies")
    stricter = edited(tmp_path, "stricter", 'deny contains "no beta" if input.arguments.text == "beta"')
    with run_opa() as opa:
        engine = OpaServerEngine(opa.url, bundle=good)
        try:
            await engine.decide(doc())
            opa.stop()
            with pytest.raises(BackendUnavailable):
                await engine.load(stricter)
            assert engine.policy_version == good.version
            opa.restart()
            report = await engine.load(stricter)
            assert report.loaded
            decision = await engine.decide(doc("beta"))
            assert (decision.reasons, decision.policy_version) == (("no beta",), stricter.version)
        finally:
            await engine.close()
