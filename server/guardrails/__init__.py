"""Content guardrails: personal data and secrets detected in tool arguments and results, for policy to decide on."""
