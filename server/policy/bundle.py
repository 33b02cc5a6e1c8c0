"""A policy bundle: the Rego modules and data files of a policy directory, read as OPA reads them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from server.errors import ConfigError

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)


def package_of(module: str) -> str:
    """The package a Rego module declares (`castellan.gateway`), or "" when it declares none."""
    match = _PACKAGE.search(module)
    return match.group(1) if match else ""


@dataclass(frozen=True, slots=True)
class PolicyBundle:
    """Modules by relative path, and one merged data document.

    As OPA loads a directory, a `data.json` in `a/b/` lands at `data.a.b`. Test modules
    (`*_test.rego`) are kept apart: they are for `policy test`, not for deciding.
    """

    root: Path
    modules: Mapping[str, str]
    tests: Mapping[str, str]
    data: Mapping[str, Any] = field(default_factory=dict)
    version: str = ""

    @classmethod
    def from_directory(cls, root: Path) -> PolicyBundle:
        if not root.is_dir():
            raise ConfigError(f"policy directory {root} does not exist")
        return cls.from_files(root, read_files(root))

    @classmethod
    def from_files(cls, root: Path, files: Mapping[str, str]) -> PolicyBundle:
        """The bundle of `files` (relative path → text, as `read_files` returns them): a snapshot read
        once, so what is verified is exactly what decides. `version` hashes what decides (modules and
        data, not tests)."""
        modules: dict[str, str] = {}
        tests: dict[str, str] = {}
        data: dict[str, Any] = {}
        digest = hashlib.sha256()
        for rel in sorted(files):
            text, path = files[rel], root / rel
            if path.suffix == ".rego":
                (tests if path.name.endswith("_test.rego") else modules)[rel] = text
            elif path.name == "data.json":
                _merge(data, list(Path(rel).parent.parts), _load_json(path, text))
            else:
                continue
            if not path.name.endswith("_test.rego"):
                digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
        if not modules:
            raise ConfigError(f"policy directory {root} holds no .rego modules")
        return cls(root=root, modules=modules, tests=tests, data=data, version=digest.hexdigest()[:16])


MASK_RULE = "data.system.log.mask"
"""The decision log's mask rule (OPA's), compiled from the bundle's `system.log` modules only."""


def log_mask_bundle(bundle: PolicyBundle) -> PolicyBundle | None:
    """The bundle the decision log's mask is evaluated with: only `bundle`'s `system.log` modules, with
    its data; None when it has none. Its `version` hashes those modules and the data, so two mask
    bundles with one version mask alike (what lets a mask evaluated with the decision stand in)."""
    modules = {p: t for p, t in bundle.modules.items() if package_of(t).startswith("system.log")}
    if not modules:
        return None
    digest = hashlib.sha256(json.dumps([sorted(modules.items()), bundle.data], sort_keys=True, default=str).encode())
    return replace(bundle, modules=modules, tests={}, version=digest.hexdigest()[:16])


def policy_files(root: Path) -> list[Path]:
    """The files a bundle is made of: `.rego` modules and tests, and `.json` data, under `root`."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".rego", ".json"))


def read_files(root: Path, paths: Iterable[Path] | None = None) -> dict[str, str]:
    """Relative path → text of every policy file under `root` (of `paths` under it, when given: files
    already listed). Raises `ConfigError` for a file that is not UTF-8, and `OSError` when one
    vanishes while being read."""
    files: dict[str, str] = {}
    for path in policy_files(root) if paths is None else paths:
        try:
            files[path.relative_to(root).as_posix()] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return files


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


def _merge(data: dict[str, Any], prefix: list[str], value: Any) -> None:
    node = data
    for part in prefix:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"data path {'.'.join(prefix)} clashes with a value")
    if not isinstance(value, dict):
        raise ConfigError(f"data.json at {'/'.join(prefix) or '.'} must hold an object")
    for key, item in value.items():
        if key in node:
            raise ConfigError(f"data key {'.'.join([*prefix, key])} is defined twice")
        node[key] = item
