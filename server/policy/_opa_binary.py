"""Where the project's own OPA binary lives (installed by scripts/install-test-deps)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from server.settings import REPO_ROOT

PROJECT_OPA = REPO_ROOT / ".cache" / "bin" / "opa"


def project_opa() -> str | None:
    """`$CASTELLAN_OPA`, else the project's .cache/bin/opa, else `opa` on PATH."""
    env = os.environ.get("CASTELLAN_OPA")
    if env and Path(env).is_file():
        return env
    if PROJECT_OPA.is_file():
        return str(PROJECT_OPA)
    return shutil.which("opa")
