"""What the detector remembers of short texts never changes what it finds: the findings of a text,
a field and kinds are those of a scan from scratch, whatever was scanned before (the same text in
another field, for other kinds, in another order)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.guardrails.detectors import Detector, _field_key, _strongest
from server.guardrails.kinds import KINDS

SNIPPETS = [
    "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005", "jo@example.org", "bsn 111222333",
    "111222333", "nhs 9434765919", "9434765919", "Steuer-ID 65929970489", "ssn 536-90-4399", "536-90-4399",
    "DNI 12345678Z", "X1234567L", "RSSMRA85T10A562S", "1 85 05 78 006 084 36", "Dr. Ada Lovelace",
    "Mr Bob", "my name is Ada Lovelace", "dear Jo Smith", "12 Main Street", "Hauptstraße 5", "PO Box 12",
    "+33 1 42 68 53 00", "call (212) 555-0100", "tel 020 7946 0958", "GB82 WEST 1234 5698 7654 32",
    "token=abcd1234efgh5678", "Bearer eyJhbGciOiJIUzI1NiJ9.abc.def", "Amelia Varga", "2026-11-23", "12:30",
]  # fmt: skip
FIELDS = ["", "text", "bsn", "nhs_number", "tax_id", "ssn", "phone", "full_name", "address", "street", "status",
          "customer_name", "steuer_id", "mobile"]  # fmt: skip
text = st.lists(st.sampled_from(SNIPPETS) | st.text(max_size=12), max_size=5).map(" ".join)
scan = st.tuples(text, st.sampled_from(FIELDS), st.frozensets(st.sampled_from(KINDS)) | st.none())


@settings(max_examples=400, deadline=None)
@given(st.lists(scan, min_size=1, max_size=8), st.randoms())
def test_remembered_findings_are_those_of_a_fresh_scan(scans: list[tuple[str, str, frozenset[str] | None]],
                                                       rnd: object) -> None:  # fmt: skip
    remembering, fresh = Detector(), Detector()
    # each scan, then the same texts again in other fields and for other kinds
    again = [(t, f2, k2) for (t, _, _), (_, f2, k2) in zip(scans, reversed(scans), strict=True)]
    for value, field, kinds in scans + again + scans:
        want = frozenset(KINDS) if kinds is None else kinds
        assert remembering.find(value, field, kinds) == _strongest(fresh._raw(value, field, want))


def test_fields_alike_for_the_detectors_share_a_key_and_others_do_not() -> None:
    assert _field_key("") == _field_key("text") == _field_key("status")
    assert _field_key("bsn") != _field_key("")
    assert _field_key("full_name") != _field_key("") != _field_key("address")
    assert _field_key("Tax_ID") == _field_key("tax_id")


def test_a_text_found_in_one_field_is_found_anew_in_a_field_that_names_its_kind() -> None:
    detector = Detector()
    assert detector.find("111222333", "batch") == []
    assert [f.type for f in detector.find("111222333", "bsn")] == ["national_id.nl.bsn"]
    assert detector.find("Amelia Varga", "status") == []
    assert [f.type for f in detector.find("Amelia Varga", "full_name")] == ["person_name.field"]
