"""The dev sign-in page: pick a demo identity, choose which requested scopes to grant. Plain HTML, no script."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from server.auth.issuer.identities import DemoIdentity
from server.auth.issuer.store import IssuerClient

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}"
    ".dev{background:#fff3cd;border:1px solid #e0b400;padding:.6rem .8rem;border-radius:4px}"
    "label{display:block;margin:.35rem 0}fieldset{margin:1rem 0;border:1px solid #ccc;border-radius:4px}"
    "button{padding:.45rem 1rem;margin-right:.5rem}code{background:#f2f2f2;padding:0 .2rem}"
)


def sign_in_page(
    *,
    action: str,
    client: IssuerClient,
    redirect_uri: str,
    params: Mapping[str, str],
    requested: Sequence[str],
    identities: Sequence[DemoIdentity],
) -> str:
    """The page for one authorization request; `params` (the request's own) are posted back unchanged."""
    hidden = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
        for k, v in params.items()
        if k not in ("identity", "grant_scope", "decision")
    )
    people = "".join(
        f'<label><input type="radio" name="identity" value="{escape(i.name)}"{" checked" if n == 0 else ""}> '
        f"<b>{escape(i.name)}</b> ({escape(i.kind)}; groups {escape(', '.join(i.groups))}) — {escape(i.description)}"
        "</label>"
        for n, i in enumerate(identities)
    )
    scopes = "".join(
        f'<label><input type="checkbox" name="grant_scope" value="{escape(s)}" checked> <code>{escape(s)}</code>'
        "</label>"
        for s in requested
    )
    scope_block = (
        f"<fieldset><legend>Scopes asked for (untick to grant less)</legend>{scopes}"
        "<small>Only administrators are granted the gateway's own <code>castellan:*</code> scopes.</small></fieldset>"
        if requested
        else "<p>The client asks for no scope.</p>"
    )
    client_name = escape(client.name or client.client_id)
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Castellan dev sign-in</title>'
        f"<style>{_STYLE}</style></head><body>"
        "<h1>Castellan dev sign-in</h1>"
        '<p class="dev"><b>Development only.</b> This issuer lets anyone who can reach it sign in as any '
        'demo identity, with no password. It runs only with <code>auth.mode = "dev"</code> and is refused '
        'with <code>environment = "production"</code>.</p>'
        f"<p><b>{client_name}</b> (<code>{escape(client.client_id)}</code>) asks to call this gateway's tools "
        f"for you, and will be sent back to <code>{escape(redirect_uri)}</code>.</p>"
        f'<form method="post" action="{escape(action)}">{hidden}'
        f"<fieldset><legend>Sign in as</legend>{people}</fieldset>{scope_block}"
        '<button type="submit" name="decision" value="allow">Sign in and allow</button>'
        '<button type="submit" name="decision" value="deny">Deny</button>'
        "</form></body></html>"
    )


def error_page(message: str) -> str:
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Castellan dev sign-in</title>'
        f"<style>{_STYLE}</style></head><body><h1>Cannot sign in</h1><p>{escape(message)}</p></body></html>"
    )
