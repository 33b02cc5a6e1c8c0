"""`castellan approvals`: list, show, approve and deny approval requests, through the gateway's
`/admin/approvals` API, as the identity of a bearer token (an approver decides as themselves)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from server.cli._common import config_option, settings_from
from server.settings import SERVING_FILE

_url_option = click.option(
    "--url", default=None, help="The gateway's base URL (default: the gateway serving from this data directory)."
)
_token_option = click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding the bearer token (default: $CASTELLAN_TOKEN). It needs the castellan:approve scope.",
)


@click.group()
def approvals() -> None:
    """Calls waiting for a human's approval (docs/approvals.md)."""


@approvals.command("list")
@config_option
@_url_option
@_token_option
@click.option("--status", default="pending", show_default=True,
              help="pending, approved, denied, expired, used (comma-separated), or all.")  # fmt: skip
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def approvals_list(
    config: Path | None, url: str | None, token_file: Path | None, status: str, limit: int, as_json: bool
) -> None:
    """Approval requests, newest first."""
    found = _request(config, url, token_file, "GET", f"?status={status}&limit={limit}")["approvals"]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no {status} approval requests")
    for item in found:
        caller = item["caller"]
        click.echo(
            f"{item['id']:22}  {item['status']:8}  {item['tool']:28}  by {caller['agent_id']}"
            f" ({caller['subject']})  approvers {','.join(item['approvers'])}  expires {item['expires_at']}"
        )


@approvals.command("show")
@config_option
@_url_option
@_token_option
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True)
def approvals_show(
    config: Path | None, url: str | None, token_file: Path | None, request_id: str, as_json: bool
) -> None:
    """One request: what the call would do, who asks, and how it was decided."""
    item = _request(config, url, token_file, "GET", f"/{request_id}")
    click.echo(json.dumps(item, indent=2) if as_json else _describe(item))


@approvals.command("approve")
@config_option
@_url_option
@_token_option
@click.argument("request_id")
@click.option("--comment", default="", help="Recorded with the approval.")
def approvals_approve(
    config: Path | None, url: str | None, token_file: Path | None, request_id: str, comment: str
) -> None:
    """Approve a pending request: its call (and only it) runs. Never your own call."""
    item = _request(config, url, token_file, "POST", f"/{request_id}/approve", {"comment": comment})
    click.echo(f"approved {item['id']}: {item['tool']} for {item['caller']['agent_id']}")


@approvals.command("deny")
@config_option
@_url_option
@_token_option
@click.argument("request_id")
@click.option("--comment", default="", help="Told to the caller and recorded.")
def approvals_deny(
    config: Path | None, url: str | None, token_file: Path | None, request_id: str, comment: str
) -> None:
    """Deny a pending request: its call is refused."""
    item = _request(config, url, token_file, "POST", f"/{request_id}/deny", {"comment": comment})
    click.echo(f"denied {item['id']}: {item['tool']} for {item['caller']['agent_id']}")


def _describe(item: dict[str, Any]) -> str:
    lines = [f"{item['id']}  {item['status']}", item["summary"], ""]
    lines.append(f"approvers: {', '.join(item['approvers'])}")
    lines.append(f"requested: {item['requested_at']}   expires: {item['expires_at']}")
    lines.append(f"call: {item['call_id']}   arguments sha256: {item['arguments_sha256']}")
    if item.get("decided_by"):
        by = item["decided_by"]
        lines.append(f"decided: {item['decided_at']} by {by['agent_id']} ({by['subject']})"
                     + (f": {item['comment']}" if item.get("comment") else ""))  # fmt: skip
    if item.get("used_by"):
        lines.append(f"ran as call {item['used_by']}")
    return "\n".join(lines)


def _base_url(config: Path | None, url: str | None) -> str:
    if url:
        return url.rstrip("/").removesuffix("/mcp")
    settings = settings_from(config)
    try:
        serving = json.loads((settings.data_dir / SERVING_FILE).read_text())
        os.kill(int(serving["pid"]), 0)
        return str(serving["resource"]).rstrip("/").removesuffix("/mcp")
    except (OSError, ValueError, KeyError, TypeError):
        return settings.base_url


def _request(
    config: Path | None, url: str | None, token_file: Path | None, method: str, path: str, body: Any = None
) -> dict[str, Any]:
    token = token_file.read_text().strip() if token_file else os.environ.get("CASTELLAN_TOKEN", "").strip()
    if not token:
        raise click.ClickException("no token: set CASTELLAN_TOKEN or pass --token-file (scope castellan:approve)")
    target = f"{_base_url(config, url)}/admin/approvals{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(target, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        raise click.ClickException(f"{exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"cannot reach the gateway at {target}: {exc}") from None
