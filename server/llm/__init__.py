"""The LLM route: an OpenAI-compatible chat completions proxy, metered and audited like tool calls."""
