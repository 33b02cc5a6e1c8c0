"""Which OAuth scopes a tool call needs: the gateway's required scopes plus the tool's own (step-up)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from server.settings import Settings


class ToolScopes:
    """`auth.required_scopes` for every call, plus `auth.tool_scopes` per tool: a key is a tool's exact
    name or a prefix ending in `*` (`"admin.*"`); every matching key's scopes are needed.

    A token without them gets HTTP 403 `insufficient_scope` naming the scopes (the MCP authorization
    spec's step-up: the client re-authorizes for them), and the authenticate stage denies the call."""

    def __init__(self, required: Sequence[str] = (), per_tool: Mapping[str, Sequence[str]] | None = None) -> None:
        self._required = tuple(dict.fromkeys(required))
        self._exact: dict[str, tuple[str, ...]] = {}
        self._prefixes: list[tuple[str, tuple[str, ...]]] = []
        for key, scopes in (per_tool or {}).items():
            if key.endswith("*"):
                self._prefixes.append((key[:-1], tuple(scopes)))
            else:
                self._exact[key] = tuple(scopes)

    @property
    def per_tool(self) -> bool:
        """Some tool needs scopes of its own (so the HTTP edge must look into tools/call bodies)."""
        return bool(self._exact or self._prefixes)

    def needed(self, tool_name: str | None) -> tuple[str, ...]:
        """The scopes a call of `tool_name` needs (None: only the gateway's required scopes)."""
        if tool_name is None:
            return self._required
        found = [*self._required, *self._exact.get(tool_name, ())]
        for prefix, scopes in self._prefixes:
            if tool_name.startswith(prefix):
                found.extend(scopes)
        return tuple(dict.fromkeys(found))

    def missing(self, tool_name: str | None, held: Iterable[str]) -> tuple[str, ...]:
        have = set(held)
        return tuple(s for s in self.needed(tool_name) if s not in have)

    def supported(self) -> list[str]:
        """Every scope a call may need, for the protected resource metadata's `scopes_supported`."""
        every = [*self._required, *(s for v in self._exact.values() for s in v)]
        every += [s for _, v in self._prefixes for s in v]
        return list(dict.fromkeys(every))


def tool_scopes(settings: Settings) -> ToolScopes:
    return ToolScopes(settings.auth.required_scopes, settings.auth.tool_scopes)
