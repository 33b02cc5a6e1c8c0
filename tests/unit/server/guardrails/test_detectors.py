"""Each detector on the shapes it must find and those it must not, and the findings' positions."""

from __future__ import annotations

import pytest

from server.guardrails.detectors import Detector, Finding

DETECTOR = Detector()


def found(text: str, field: str = "") -> list[tuple[str, str]]:
    return [(f.type, text[f.start : f.end]) for f in DETECTOR.find(text, field)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4111-1111-1111-1111.", [("card.visa", "4111-1111-1111-1111")]),
        ("amex 3782 822463 10005", [("card.amex", "3782 822463 10005")]),
        ("IBAN GB82 WEST 1234 5698 7654 32 to pay", [("iban.gb", "GB82 WEST 1234 5698 7654 32")]),
        ("ssn 536-90-4399", [("national_id.us.ssn", "536-90-4399")]),
        ("DNI 12345678Z", [("national_id.es.dni", "12345678Z")]),
        ("+33 1 42 68 53 00", [("phone.fr", "+33 1 42 68 53 00")]),
        ("Dr. Ada Lovelace", [("person_name.title", "Ada Lovelace")]),
    ],
)
def test_each_detector_finds_its_kind_and_where(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


def test_a_luhn_valid_number_outside_every_card_network_is_not_a_card() -> None:
    assert found("loyalty 9000000000000008") == []


def test_a_bare_national_id_needs_a_word_or_a_field_naming_it() -> None:
    assert found("batch 111222333") == []
    assert found("bsn 111222333") == [("national_id.nl.bsn", "111222333")]
    assert found("111222333", "bsn") == [("national_id.nl.bsn", "111222333")]


def test_a_name_is_found_by_its_field() -> None:
    assert found("Amelia Varga", "full_name") == [("person_name.field", "Amelia Varga")]
    assert found("Amelia Varga", "status") == []


def test_overlapping_findings_keep_the_checksummed_one() -> None:
    """A card number's digits could be read as a phone number too: one finding, the card."""
    assert [f.kind for f in DETECTOR.find("call 4111 1111 1111 1111")] == ["card_number"]


def test_only_the_kinds_configured_are_detected() -> None:
    emails_only = Detector(kinds=["email"])
    assert [f.kind for f in emails_only.find("jo@example.org 4111 1111 1111 1111")] == ["email"]
    with pytest.raises(ValueError, match="unknown detection kinds"):
        Detector(kinds=["passport"])


def test_a_long_text_is_scanned_in_full() -> None:
    text = "log line without anything\n" * 5000 + "card 4111 1111 1111 1111"
    assert DETECTOR.find(text) == [Finding("card_number", "card.visa", len(text) - 19, len(text))]


def test_non_ascii_text_takes_the_full_scan() -> None:
    assert found("Überweisung an DE89 3704 0044 0532 0130 00 für Müller") == [
        ("iban.de", "DE89 3704 0044 0532 0130 00")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "2a9ac495f74a4111111111111111cea",  # a hex id whose digits hold a Luhn-valid Visa number (seen in CI)
        "x4111111111111111",
        "4111111111111111ab",
        "id536-90-4399z",
        "sha 9f4111111111111111e0",
        "bsn a111222333",
    ],
)
def test_digits_inside_a_longer_word_are_no_number_a_person_wrote(text: str) -> None:
    assert found(text, "bsn") == []


def test_random_hex_ids_and_hashes_hold_no_personal_data() -> None:
    """The class, not the one sample: ids an agent echoes (uuid4 hex, sha256 digests) are never masked."""
    import hashlib
    import random

    rng = random.Random(20261201)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(3000)]
    ids += [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    # digit-heavy ids make a hit likely on the old patterns: hex of decimal-looking numbers
    ids += [f"{rng.randrange(10**18, 10**19)}{rng.choice('abcdef')}{rng.randrange(10**15)}" for _ in range(3000)]
    assert [(i, found(i)) for i in ids if found(i)] == []
