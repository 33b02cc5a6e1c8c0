"""Detectors of personal data and secrets in one text: where each finding is and what it is.

Each detector finds candidates with a linear-time pattern and lets a maintained library decide:
python-stdnum checks the checksums (Luhn for card numbers, ISO 7064 for IBANs, each country's rule for
national ids), libphonenumber (`phonenumbers`, lite build) says whether a candidate is a valid phone
number of its region, and the audit redactor's `SecretScanner` (detect-secrets' detectors behind one
RE2 gate) finds secrets. Nothing is downloaded and no model runs: names and addresses are found
only where their shape or their field says so (a title before a name, a number before a street,
a member called `full_name` or `address`), which a model-free detector can do honestly.

A number that would be a valid national id only by accident (9, 10 or 11 bare digits pass a
mod-11 check one time in eleven) is reported only with a word naming it nearby (`BSN`, `NHS`,
`Steuer-ID`) or in a field named for it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import phonenumbers
import re2  # type: ignore[import-untyped]
from stdnum import iban, luhn
from stdnum.de import idnr
from stdnum.es import dni, nie
from stdnum.fr import nir
from stdnum.gb import nhs
from stdnum.it import codicefiscale
from stdnum.nl import bsn
from stdnum.us import ssn

from server.audit.redaction import SecretScanner
from server.guardrails.kinds import KINDS, PERSONAL_DATA, SECRET


@dataclass(frozen=True, slots=True)
class Finding:
    """One detection in a text: `text[start:end]` is a `kind` (`type` says which: `card.visa`,
    `national_id.fr.nir`, `phone.de`)."""

    kind: str
    type: str
    start: int
    end: int

    @property
    def category(self) -> str:
        return SECRET if self.kind == "secret" else PERSONAL_DATA


_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
# 13 to 19 digits, in groups a person writes (spaces or dashes between them). A run of digits inside a
# longer word (a hex id, a hash, a base64 blob) is no number a person wrote: the digit detectors need
# neither a letter nor a digit on either side (_NOT_IN_WORD / _NOT_BEFORE_WORD).
_NOT_IN_WORD, _NOT_BEFORE_WORD = r"(?<![\dA-Za-z-])", r"(?![\dA-Za-z])"
_CARD = re.compile(rf"{_NOT_IN_WORD}\d(?:[ -]?\d){{12,18}}{_NOT_BEFORE_WORD}")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?![A-Za-z0-9])")
_PHONE = re.compile(r"(?<![\w+(\-])(?:\+|00|\()?\d[\d ().\-/]{5,20}\d(?![\w])")
# What looks like a phone number's digits but is a date or a time.
_DATE = re.compile(r"^\(?\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|^\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}$|^\d{1,2}:\d{2}")
_PHONE_WORDS = ("phone", "tel", "call", "mobile", "cell", "fax", "whatsapp", "sms", "handy", "portable")
_SSN = re.compile(rf"{_NOT_IN_WORD}\d{{3}}-\d{{2}}-\d{{4}}(?![\dA-Za-z-])")
_DIGITS = {n: re.compile(rf"(?<![\dA-Za-z])\d(?:[ .-]?\d){{{n - 1}}}{_NOT_BEFORE_WORD}") for n in (9, 10, 11)}
_NIR = re.compile(
    r"(?<![\dA-Za-z])[12][ ]?\d{2}[ ]?\d{2}[ ]?(?:\d{2}|2[AB])[ ]?\d{3}[ ]?\d{3}[ ]?\d{2}" + _NOT_BEFORE_WORD, re.I
)
_DNI = re.compile(r"(?<![\dA-Za-z])\d{8}-?[A-Za-z](?![A-Za-z0-9])")
_NIE = re.compile(r"(?<![\dA-Za-z])[XYZxyz]-?\d{7}-?[A-Za-z](?![A-Za-z0-9])")
_CODICE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{6}\d{2}[A-Za-z]\d{2}[A-Za-z]\d{3}[A-Za-z](?![A-Za-z0-9])")
_UPPER, _LOWER = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ'\\-"
_TITLE_NAME = re.compile(
    rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Herr|Frau|Mme|Mlle|M)\.? "
    rf"([{_UPPER}][{_LOWER}]+(?: [{_UPPER}][{_LOWER}]+){{0,2}})\b"
)
_INTRODUCED_NAME = re.compile(
    r"(?i:\b(?:my name is|name:|patient:|customer:|employee:|contact:|dear))\s+"
    rf"([{_UPPER}][{_LOWER}]+(?: [{_UPPER}][{_LOWER}]+){{1,2}})\b"
)
_STREET = re.compile(
    r"(?i)\b\d{1,5}[A-Za-z]?,? (?:[A-Za-z0-9.'\-]+ ){1,4}"
    r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|"
    r"square|sq|parkway|pkwy|highway|hwy|close|crescent|rue|chemin|allée|impasse)\b\.?"
    r"|\b\d{1,4},? (?:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai) (?:[A-Za-zÀ-ÿ'\-]+ ?){1,5}"
    r"|\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee|ring|damm) \d{1,4}[a-z]?\b"
    r"|\bP\.? ?O\.? Box \d{1,6}\b"
)

# (type, pattern, validator, context words that must sit within 48 characters before, or in the field name)
_NATIONAL_IDS: tuple[tuple[str, re.Pattern[str], Callable[[str], bool], tuple[str, ...]], ...] = (
    ("us.ssn", _SSN, ssn.is_valid, ()),
    ("us.ssn", _DIGITS[9], ssn.is_valid, ("ssn", "social security")),
    ("fr.nir", _NIR, nir.is_valid, ()),
    ("es.dni", _DNI, dni.is_valid, ()),
    ("es.nie", _NIE, nie.is_valid, ()),
    ("it.codicefiscale", _CODICE, codicefiscale.is_valid, ()),
    ("nl.bsn", _DIGITS[9], bsn.is_valid, ("bsn", "burgerservicenummer", "sofinummer", "sofi")),
    ("gb.nhs", _DIGITS[10], nhs.is_valid, ("nhs",)),
    ("de.idnr", _DIGITS[11], idnr.is_valid, ("steuer", "idnr", "identifikationsnummer", "tax id", "tin")),
)

# Issuer prefixes (IIN ranges) of the card networks, so a Luhn-valid number of any other shape
# (an order number, one in ten of them) is not a card.
_CARD_BRANDS: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[int, ...]], ...] = (
    ("amex", ((34, 34), (37, 37)), (15,)),
    ("visa", ((4, 4),), (13, 16, 19)),
    ("mastercard", ((51, 55), (2221, 2720)), (16,)),
    ("discover", ((6011, 6011), (644, 649), (65, 65)), (16, 19)),
    ("jcb", ((3528, 3589),), (16, 19)),
    ("diners", ((300, 305), (36, 36), (38, 39)), (14, 16, 19)),
    ("unionpay", ((62, 62),), (16, 17, 18, 19)),
    ("maestro", ((5018, 5018), (5020, 5020), (5038, 5038), (6304, 6304), (6759, 6759)), tuple(range(12, 20))),
)

# One linear-time RE2 pass per kind says whether a text can hold one at all (a superset of each
# detector's candidates, without their look-arounds); only then do the detector's own patterns
# run. Most long text holds nothing, and a 100 KB log then costs a few RE2 scans. Text that is not ASCII
# always gets the full scan (RE2's \d and letters are ASCII here, Python's are not).
_STREET_WORDS = (
    "street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|way|place|pl|terrace|square|sq|"
    "parkway|pkwy|highway|hwy|close|crescent|rue|chemin|impasse|bd|quai"
)
_GATE_PATTERNS = {
    "card_number": r"\d(?:[ -]?\d){12}",
    "iban": r"[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11}",
    "national_id": r"\d{3}-\d{2}-\d{4}|\d(?:[ .-]?\d){8}|\d{8}-?[A-Za-z]|[XYZxyz]-?\d{7}|[A-Za-z]{6}\d{2}[A-Za-z]\d{2}",
    "phone": r"(?:^|[^\w+])(?:\+|00)\d|\d(?:[ ().\-/]{0,2}\d){9}",
    "address": rf"(?i)\b(?:{_STREET_WORDS})\b"
    r"|(?:stra(?:ss|ß)e|str\.|weg|gasse|platz|allee|ring|damm) \d|p\.? ?o\.? box",
    "person_name": r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Herr|Frau|Mme|Mlle|M)\.? [A-Z]"
    r"|(?i:my name is|name:|patient:|customer:|employee:|contact:|dear)\s",
}
_GATES = {kind: re2.compile(pattern) for kind, pattern in _GATE_PATTERNS.items()}
_CACHE_ENTRIES, _CACHE_CHARS = 8_192, 256
_GATE_CHARS = 512
"""Shorter texts skip the gates: a call into RE2 costs more than the detectors' own patterns there."""

NAME_FIELDS = frozenset(
    {"name", "full_name", "fullname", "first_name", "firstname", "last_name", "lastname", "surname", "given_name",
     "family_name", "customer_name", "contact_name", "patient_name", "employee_name", "person", "holder_name",
     "cardholder", "cardholder_name", "display_name", "author_name"}
)  # fmt: skip
ADDRESS_FIELDS = frozenset(
    {"address", "street", "street_address", "home_address", "address_line1", "address_line_1", "address1",
     "addr", "mailing_address", "billing_address", "shipping_address", "postal_address"}
)  # fmt: skip
_NAME_VALUE = re.compile(r"^[A-Za-zÀ-ÿ][A-Za-zÀ-ÿ'\-.]*(?: [A-Za-zÀ-ÿ][A-Za-zÀ-ÿ'\-.]*){0,3}$")
_DIGITS_ONLY = re.compile(r"\D")
_DIGIT = re.compile(r"\d")
_NUMBER = re.compile(r"\d(?:[ ().\-/]{0,2}\d){6}")


def _brand(digits: str) -> str | None:
    for brand, ranges, lengths in _CARD_BRANDS:
        if len(digits) not in lengths:
            continue
        for low, high in ranges:
            width = len(str(low))
            if low <= int(digits[:width]) <= high:
                return brand
    return None


def _context(text: str, start: int, words: tuple[str, ...], field: str) -> bool:
    if not words:
        return True
    window = text[max(0, start - 48) : start].lower()
    name = field.lower()
    return any(w in window or w.replace(" ", "_") in name for w in words)


class Detector:
    """Finds personal data and secrets in a text. `phone_regions`: the regions whose national numbers
    (without a `+` country code) count as phone numbers; an international number counts whatever its
    region. `secrets`: the scanner the audit redactor uses (one set of secret rules for the gateway).

    `find(text, field)` never raises on any string; `field` is the name of the member the text is the
    value of ("" in free text), which lets a name or address be recognised by where it sits.
    """

    def __init__(
        self,
        secrets: SecretScanner | None = None,
        phone_regions: Iterable[str] = ("US", "GB", "DE", "FR"),
        kinds: Iterable[str] = KINDS,
    ) -> None:
        self._secrets = secrets or SecretScanner()
        self._regions = tuple(r.upper() for r in phone_regions)
        self._kinds = frozenset(kinds)
        unknown = self._kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown detection kinds {sorted(unknown)}; choose from {list(KINDS)}")

        # Values repeat from call to call (statuses, names, the same rows), and one text is scanned
        # again in another field or for other kinds (a call's arguments, then the result that echoes
        # them): a short text's findings are remembered per kind, under what its field says
        # (`_field_key`), never under the field's name itself.
        self._memo: dict[tuple[str, _FieldKey], _Memo] = {}

    def find(self, text: str, field: str = "", kinds: frozenset[str] | None = None) -> list[Finding]:
        """Every finding in `text`, in order of position; overlapping findings keep the stronger
        (a checksummed id over a phone number that shares its digits)."""
        want = self._kinds if kinds is None else kinds & self._kinds
        if len(text) > _CACHE_CHARS:
            return _strongest(self._raw(text, field, want))
        memo, key = self._memo, (text, _field_key(field))
        entry = memo.get(key)
        if entry is None:  # a text not seen yet (in fields alike): scanned, and remembered per kind
            raw = self._raw(text, field, want)
            result = _strongest(raw)
            if len(memo) >= _CACHE_ENTRIES:
                memo.clear()  # one atomic step: scans of large payloads run in worker threads
            memo[key] = (_by_kind(want, raw), {want: tuple(result)})
            return result
        by_kind, results = entry
        done = results.get(want)
        if done is not None:
            return list(done)
        missing = want.difference(by_kind)
        if missing:
            by_kind.update(_by_kind(missing, self._raw(text, field, frozenset(missing))))
        found = [finding for kind in want for finding in by_kind[kind]]
        if len(found) > 1:
            found.sort(key=_order)  # as `_raw` lists them, whatever order the kinds came in
        result = _strongest(found)
        results[want] = tuple(result)
        return result

    def _raw(self, text: str, field: str, kinds: frozenset[str]) -> list[Finding]:
        """The findings of `kinds`, overlapping ones too, listed by where their detector runs (`_order`).
        What `field` changes is all in `_field_key`."""
        if len(text) > _GATE_CHARS and text.isascii():
            want = {k for k in kinds if k not in _GATES or _GATES[k].search(text) is not None}
            if "address" in kinds and field.lower() in ADDRESS_FIELDS:
                want.add("address")
            if "person_name" in kinds and field.lower() in NAME_FIELDS:
                want.add("person_name")
        else:
            want = set(kinds)
        found: list[Finding] = []
        has_digit = _DIGIT.search(text) is not None
        # Cards, IBANs, phones and all national ids but the Italian one hold a run of 7 digits or more.
        has_number = has_digit and _NUMBER.search(text) is not None
        if "secret" in want:
            found += [Finding("secret", "secret", s, e) for s, e in self._secrets.spans(text)]
        if "email" in want and "@" in text:
            found += [Finding("email", "email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
        if has_number:
            if "card_number" in want:
                found += self._cards(text)
            if "iban" in want:
                found += self._ibans(text)
            if "national_id" in want:
                found += self._national_ids(text, field)
            if "phone" in want:
                found += self._phones(text, field)
        elif has_digit and "national_id" in want:
            found += [Finding("national_id", "national_id.it.codicefiscale", m.start(), m.end())
                      for m in _CODICE.finditer(text) if _valid(codicefiscale.is_valid, m.group())]  # fmt: skip
        if has_digit and "address" in want:
            found += [Finding("address", "address.street", m.start(), m.end()) for m in _STREET.finditer(text)]
        if "person_name" in want:
            found += self._names(text, field)
        if "address" in want and field.lower() in ADDRESS_FIELDS and has_digit and any(c.isalpha() for c in text):
            found.append(Finding("address", "address.field", 0, len(text)))
        return found

    def _cards(self, text: str) -> list[Finding]:
        out = []
        for match in _CARD.finditer(text):
            digits = _DIGITS_ONLY.sub("", match.group())
            if len(set(digits)) > 1 and luhn.is_valid(digits) and (brand := _brand(digits)):
                out.append(Finding("card_number", f"card.{brand}", match.start(), match.end()))
        return out

    def _ibans(self, text: str) -> list[Finding]:
        out = []
        for match in _IBAN.finditer(text):
            # The pattern may run on into the next word: the longest prefix that validates is the IBAN.
            positions = [match.start() + i for i, c in enumerate(match.group()) if c != " "]
            compact = "".join(text[i] for i in positions).upper()
            for n in range(len(compact), 14, -1):
                if iban.is_valid(compact[:n]):
                    out.append(Finding("iban", f"iban.{compact[:2].lower()}", match.start(), positions[n - 1] + 1))
                    break
        return out

    def _national_ids(self, text: str, field: str) -> list[Finding]:
        out = []
        lowered = text.lower()
        name = field.lower()
        for kind, pattern, valid, words in _NATIONAL_IDS:
            if words and not any(w in lowered or w.replace(" ", "_") in name for w in words):
                continue  # no word names this id anywhere: none of its bare digits can count
            for match in pattern.finditer(text):
                if _context(text, match.start(), words, field) and _valid(valid, match.group()):
                    out.append(Finding("national_id", f"national_id.{kind}", match.start(), match.end()))
        return out

    def _phones(self, text: str, field: str) -> list[Finding]:
        out = []
        for match in _PHONE.finditer(text):
            candidate = match.group()
            digits = sum(c.isdigit() for c in candidate)
            if digits < 7 or digits > 15 or _DATE.match(candidate):
                continue
            international = candidate.startswith(("+", "00"))
            if not international and (
                digits < 10
                # A national number as bare digits is as likely an order or account number: only
                # written as a phone number is (separators), or said to be one.
                or (candidate.isdigit() and not _context(text, match.start(), _PHONE_WORDS, field))
            ):
                continue
            where = _phone_region(candidate, None if international else self._regions)
            if where is not None:
                out.append(Finding("phone", f"phone.{where}", match.start(), match.end()))
        return out

    def _names(self, text: str, field: str) -> list[Finding]:
        if field.lower() in NAME_FIELDS:
            value = text.strip()
            if 2 <= len(value) <= 80 and _NAME_VALUE.match(value) and any(c.isupper() for c in value[:1]):
                start = text.index(value[0])
                return [Finding("person_name", "person_name.field", start, start + len(value))]
            return []
        out = [Finding("person_name", "person_name.title", m.start(1), m.end(1)) for m in _TITLE_NAME.finditer(text)]
        for match in _INTRODUCED_NAME.finditer(text):
            out.append(Finding("person_name", "person_name.introduced", match.start(1), match.end(1)))
        return out


_FieldKey = tuple[bool, bool, tuple[str, ...]]
_CONTEXT_WORDS = tuple(dict.fromkeys(w for *_, words in _NATIONAL_IDS for w in words)) + _PHONE_WORDS


_Memo = tuple[dict[str, tuple[Finding, ...]], dict[frozenset[str], tuple[Finding, ...]]]
"""What one short text in fields alike was found to hold: each kind's findings, and the result for
each set of kinds asked for."""


def _by_kind(kinds: Iterable[str], found: list[Finding]) -> dict[str, tuple[Finding, ...]]:
    grouped: dict[str, tuple[Finding, ...]] = dict.fromkeys(kinds, ())
    for finding in found:
        grouped[finding.kind] += (finding,)
    return grouped


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _field_key(field: str) -> _FieldKey:
    """All a detector reads of a field's name: whether it names an address or a name, and which
    context words (`_NATIONAL_IDS`, `_PHONE_WORDS`) it holds. Fields with one key find the same."""
    name = field.lower()
    return name in ADDRESS_FIELDS, name in NAME_FIELDS, tuple(w for w in _CONTEXT_WORDS if w.replace(" ", "_") in name)


# Where each detector's findings stand in `_raw`'s list; a stable sort by (start, this) keeps the
# order `_strongest` resolves ties in, however the kinds' findings were put together.
_RANK = {"secret": 0, "email": 1, "card_number": 2, "iban": 3, "national_id": 4, "phone": 5, "address": 6,
         "person_name": 7}  # fmt: skip


def _order(finding: Finding) -> tuple[int, int]:
    return finding.start, 8 if finding.type == "address.field" else _RANK[finding.kind]


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _phone_region(candidate: str, regions: tuple[str, ...] | None) -> str | None:
    """The region (lower case) of the valid phone number `candidate` is, read as international
    (`regions` None) or as a national number of the first of `regions` it is valid in; else None."""
    text = "+" + candidate[2:] if candidate.startswith("00") else candidate
    for region in regions or (None,):
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return str(phonenumbers.region_code_for_country_code(number.country_code or 0) or "zz").lower()
    return None


def _valid(check: Callable[[str], bool], value: str) -> bool:
    try:
        return bool(check(value))
    except Exception:  # a validator that chokes on a candidate means "not this kind"
        return False


_STRENGTH = {
    "secret": 0, "card_number": 1, "iban": 1, "national_id": 2, "email": 3, "phone": 4, "address": 5, "person_name": 6,
}  # fmt: skip


def _strongest(found: list[Finding]) -> list[Finding]:
    """Findings without those overlapped by a stronger one, in order of position (one sweep: of
    overlapping findings the strongest stays, then the longest)."""
    if len(found) <= 1:
        return found
    kept: list[Finding] = []
    for finding in sorted(found, key=lambda f: f.start):
        if kept and finding.start < kept[-1].end:
            last = kept[-1]
            if (_STRENGTH[finding.kind], last.end - last.start) < (_STRENGTH[last.kind], finding.end - finding.start):
                kept[-1] = finding
            continue
        kept.append(finding)
    return kept
