"""The agent's settings, from `CASTELLAN_AGENT_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CASTELLAN_AGENT_", extra="ignore")

    gateway_url: str = "http://127.0.0.1:8750/mcp"
    token: str = ""
    """The agent's bearer token for the gateway (or `token_file`)."""
    token_file: Path | None = None
    protocol: Literal["auto", "legacy", "2026-07-28"] = "auto"
    llm_base_url: str = ""
    """An OpenAI-compatible API base. Default: the gateway's own LLM route (`<gateway>/v1`), so the
    model's tokens are metered against the agent's budget."""
    llm_api_key: str = ""
    """Default: the agent's gateway token (what the gateway's LLM route expects)."""
    model: str = "gpt-4o-mini"
    max_steps: int = Field(default=8, ge=1, le=100)
    timeout_seconds: float = Field(default=60.0, gt=0)
    judge_base_url: str = ""
    """An OpenAI-compatible endpoint for the answer-quality judge in `eval` (off when empty)."""
    judge_api_key: str = ""
    judge_model: str = "gpt-4o-mini"
    mlflow_tracking_uri: str = ""
    """Where `eval` logs its results with mlflow.genai.evaluate (default: a local store in .castellan/)."""
    mlflow_experiment: str = "castellan-agent-eval"

    def bearer(self) -> str:
        if self.token:
            return self.token.strip()
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        raise ValueError("no token: set CASTELLAN_AGENT_TOKEN or CASTELLAN_AGENT_TOKEN_FILE")

    def llm_base(self) -> str:
        return self.llm_base_url or self.gateway_url.rsplit("/mcp", 1)[0] + "/v1"
