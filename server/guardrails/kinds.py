"""The kinds of content the guardrails detect: the values `input.detections[_].kind` takes."""

from __future__ import annotations

KINDS = ("email", "phone", "card_number", "iban", "national_id", "person_name", "address", "secret")
PERSONAL_DATA = "personal_data"
SECRET = "secret"
