"""Writes samples.jsonl beside this file: the labelled, synthetic sample set the guardrail detectors are
measured on (tests/unit/server/guardrails/test_quality.py, bench/guardrails.py). Every value is made up:
numbers are generated to pass (or, for the hard negatives, to fail or to only look like) their
checksums; names, streets and addresses are invented. Run it again to regenerate (seeded)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from stdnum import iban, luhn
from stdnum.de import idnr
from stdnum.es import dni
from stdnum.fr import nir
from stdnum.gb import nhs
from stdnum.nl import bsn

rng = random.Random(20261201)
samples: list[dict[str, object]] = []


def add(text: str, *expect: tuple[str, str], field: str = "") -> None:
    for _kind, value in expect:
        assert value in text, (value, text)
    samples.append({"text": text, "field": field, "expect": [{"kind": k, "value": v} for k, v in expect]})


def digits(n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def card(prefix: str, length: int) -> str:
    body = prefix + digits(length - len(prefix) - 1)
    return body + luhn.calc_check_digit(body)


def grouped(number: str, sep: str = " ") -> str:
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def make_iban(country: str, bban: str) -> str:
    check = iban.calc_check_digits(country + "00" + bban)
    return country + check + bban


FIRST = ["Amelia", "Jonas", "Priya", "Mateo", "Ingrid", "Kofi", "Sofia", "Lukas", "Hana", "Oscar", "Elena", "Tobias"]
LAST = ["Varga", "Okafor", "Lindqvist", "Moreau", "Castillo", "Brandt", "Nakamura", "Ferreira", "Kowalski", "Dubois"]
STREETS = ["Maple", "Harbor", "Juniper", "Old Mill", "Cedar Ridge", "Lantern", "Willow Creek", "Quarry"]
SUFFIX = ["Street", "Avenue", "Road", "Lane", "Drive", "Boulevard", "Court", "Way"]
DOMAINS = ["example.com", "example.org", "mail.example.net", "corp.example.co.uk", "example.io"]

# Emails
for _ in range(20):
    user = rng.choice(["j.doe", "amelia.varga", "ops+alerts", "k_okafor", "sales", "priya.n", "x" + digits(3)])
    email = f"{user}@{rng.choice(DOMAINS)}"
    template = rng.choice(
        ["Contact {e} for access.", "reply-to: {e}", "cc {e}, thanks", "{e}", "Send the report to <{e}>."]
    )
    add(template.format(e=email), ("email", email))

# Card numbers (every network, spaced, dashed, run together)
for prefix, length in [
    ("4", 16),
    ("51", 16),
    ("55", 16),
    ("2221", 16),
    ("34", 15),
    ("37", 15),
    ("6011", 16),
    ("65", 16),
    ("3530", 16),
    ("36", 14),
    ("62", 16),
    ("4", 13),
    ("4", 19),
] * 2:
    number = card(prefix, length)
    written = rng.choice([number, grouped(number), grouped(number, "-")])
    template = rng.choice(["Charge card {c} for the renewal", "card_number={c}", "paid with {c} on file", "{c}"])
    add(template.format(c=written), ("card_number", written))

# IBANs
for country, bban in [
    ("DE", "37040044" + digits(10)),
    ("GB", "NWBK601613" + digits(8)),
    ("FR", "20041010" + digits(11) + "C" + digits(2)),
    ("NL", "ABNA0" + digits(9)),
    ("ES", "2100" + digits(16)),
    ("IT", "X0542811101" + digits(12)),
    ("BE", "539" + digits(9)),
    ("CH", "00762" + digits(12)),
] * 2:
    value = make_iban(country, bban)
    if not iban.is_valid(value):
        continue
    written = rng.choice([value, " ".join(value[i : i + 4] for i in range(0, len(value), 4))])
    add(
        rng.choice(["Wire it to {v} please", "IBAN: {v}", "beneficiary account {v}."]).format(v=written),
        ("iban", written),
    )

# Phone numbers
for phone in [
    "+1 415 555 2671",
    "(212) 555-0147",
    "+44 20 7946 0958",
    "020 7946 0321",
    "+49 30 901820",
    "+49 89 1234 5678",
    "030 12345678",
    "+33 1 23 45 67 89",
    "01 42 68 53 00",
    "+1-646-555-0199",
    "415-555-0132",
    "+31 20 123 4567",
    "+34 912 345 678",
    "+39 06 1234 5678",
    "+61 2 9374 4000",
    "0049 40 3060 0",
]:
    add(
        rng.choice(["Call me on {p}", "tel: {p}", "Phone {p} (office)", "reach the desk at {p} after 9"]).format(
            p=phone
        ),
        ("phone", phone),
    )

# National ids
for _ in range(6):
    area, group, serial = rng.randint(1, 665), rng.randint(1, 99), rng.randint(1, 9999)
    ssn = f"{area:03d}-{group:02d}-{serial:04d}"
    add(
        rng.choice(["SSN {s} on the W-4", "employee ssn: {s}", "Social security number {s}"]).format(s=ssn),
        ("national_id", ssn),
    )


def valid_random(length: int, check: object, first: str = "") -> str:
    while True:
        value = first + digits(length - len(first))
        if check(value):  # type: ignore[operator]
            return value


for _ in range(4):
    number = valid_random(10, nhs.is_valid, "9")
    written = f"{number[:3]} {number[3:6]} {number[6:]}"
    add(f"NHS number {written} registered", ("national_id", written))
for _ in range(4):
    value = valid_random(11, idnr.is_valid, str(rng.randint(1, 9)))
    add(f"Steuer-ID {value} laut Bescheid", ("national_id", value))
for _ in range(4):
    body = (
        str(rng.choice([1, 2]))
        + f"{rng.randint(40, 99):02d}{rng.randint(1, 12):02d}{rng.randint(1, 95):02d}"
        + digits(6)
    )
    value = body + f"{nir.calc_check_digits(body)}"
    written = f"{value[0]} {value[1:3]} {value[3:5]} {value[5:7]} {value[7:10]} {value[10:13]} {value[13:]}"
    add(f"numéro de sécurité sociale {written}", ("national_id", written))
for _ in range(4):
    body = digits(8)
    value = body + dni.calc_check_digit(body)
    add(f"DNI {value} del titular", ("national_id", value))
for _ in range(3):
    add(f"BSN: {(value := valid_random(9, bsn.is_valid, '1'))}", ("national_id", value))
add("codice fiscale RSSMRA85T10A562S per la fattura", ("national_id", "RSSMRA85T10A562S"))

# Names (only where a model-free detector can see them: a title, an introduction, a field named for one)
for _ in range(10):
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    add(name, ("person_name", name), field=rng.choice(["full_name", "customer_name", "name", "cardholder"]))
for _ in range(6):
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    add(
        rng.choice(["Dr. {n} will see you", "Please thank Ms. {n} for the review", "My name is {n}."]).format(n=name),
        ("person_name", name),
    )
for _ in range(5):  # names in running text with nothing to go on: a model-free detector misses these
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    add(f"{name} approved the change yesterday", ("person_name", name))

# Addresses
for _ in range(10):
    street = f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(SUFFIX)}"
    add(rng.choice(["Ship to {a}, Springfield", "office at {a}", "{a}, Apt 4"]).format(a=street), ("address", street))
for street in ["Lindenstraße 12", "Hauptstr. 5", "Am Mühlenweg 3"]:
    value = street.replace("Am ", "")
    add(f"Lieferadresse: {street}, 10115 Berlin", ("address", value))
add("12 rue des Lilas, 75011 Paris", ("address", "12 rue des Lilas"))
add("Flat 2, Rosewood Mansions, Bath", ("address", "Flat 2, Rosewood Mansions, Bath"), field="address")

# Secrets (the audit redactor's rules)
add("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", ("secret", "AKIAIOSFODNN7EXAMPLE"))
add("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlc2lnbmF0dXJl",
    ("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlc2lnbmF0dXJl"))  # fmt: skip
add("password=Tr0ub4dor&3xyz in the old config", ("secret", "Tr0ub4dor&3xyz"))
add("token: ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", ("secret", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"))
add("postgres://app:s3cr3tPassw0rd@db.internal:5432/app", ("secret", "s3cr3tPassw0rd"))

# Written other ways than the generators above: case, punctuation, JSON, other conventions
add('{"customer": {"contact": "Priya.Nair@Example.COM"}}', ("email", "Priya.Nair@Example.COM"))
add("mailto:billing-team@sub.example.org?subject=x", ("email", "billing-team@sub.example.org"))
add("Call +1 (415) 555-2671 tomorrow", ("phone", "+1 (415) 555-2671"))
add("mobile 415.555.0175", ("phone", "415.555.0175"))
add("Tel. +41 44 668 18 00", ("phone", "+41 44 668 18 00"))
add('{"pan": "5105105105105100", "exp": "12/29"}', ("card_number", "5105105105105100"))
add("iban de89 3704 0044 0532 0130 00 (lower case)", ("iban", "de89 3704 0044 0532 0130 00"))
add("ssn 536904399 as typed", ("national_id", "536904399"))
add("ssn 078-05-1120 (the Woolworth wallet card's: the SSA voided it)")
add("Herr Müller ruft zurück", ("person_name", "Müller"))
add("Prof. Ada Lovelace gave the talk", ("person_name", "Ada Lovelace"))
add("PO Box 1234, Anytown", ("address", "PO Box 1234"))
add("deliver to 742 Evergreen Terrace", ("address", "742 Evergreen Terrace"))
add("api_key: sk_live_51HxYzAbCdEfGhIjKlMnOpQrStUv", ("secret", "sk_live_51HxYzAbCdEfGhIjKlMnOpQrStUv"))

# Hard negatives: things a careless detector would take for personal data
negatives = [
    "Order 2026-11-23 shipped, total 1234567 units",
    "build 4.12.3-rc1 on 10.0.0.12 at 12:30:45",
    "invoice INV-2026-000417 due 30/11/2026",
    "tracking 1Z999AA10123456784 left the depot",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "uuid 3f2504e0-4f89-11d3-9a0c-0305e82c3301",
    "ISBN 978-3-16-148410-0 is in stock",
    "the meeting is at 10:30 in room 4.12",
    "price 1,299.00 EUR for 3 seats",
    "row count 123456789 after the load",
    "account number 12345678901 with no context",
    "Version 2024.11.05 released",
    "temperature 21.5 C, humidity 40 %",
    "call stack depth 1024 exceeded",
    "Mr. Clean is a brand, not a person",  # a title before a word: expected miss-as-FP
    "Route 66 runs west",
    "SELECT * FROM orders WHERE id = 4111",
    "coordinates 48.8584, 2.2945",
    "port 5432, retries 3, timeout 30000",
    "ticket #5555 closed by the team",
    "The 4th street festival moved indoors",  # no number before the street
    "serial 4000 0000 0000 0001 0002",
    "phone home is a film quote",
    "reference 9780306406157",
    "epoch 1764590400 seconds",
    "GB compliance check passed with code 44",
    "card game with 52 cards",
    "see section 12.3.4 of the spec",
    "max_tokens: 100000",
    "part no. 4111-1111-11 in the catalogue",
    "sku AB12 3456 7890 1234 5678 in stock",
    "Maple syrup, 2 bottles",
    "admin@localhost is not an address here",
    "the email field is empty",
]
for _ in range(10):  # Luhn-valid numbers of no card network, random 16 digits that fail Luhn
    body = "9" + digits(14)
    negatives.append(f"loyalty id {body + luhn.calc_check_digit(body)}")
    bad = card("4", 16)
    bad = bad[:-1] + str((int(bad[-1]) + 1) % 10)
    negatives.append(f"reference {bad}")
for _ in range(5):  # 9, 10 and 11 digit numbers that pass a national id check but say nothing of one
    negatives.append(f"batch {digits(9)} queued")
for text in negatives:
    add(text)

out = Path(__file__).with_name("samples.jsonl")
out.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
print(f"{len(samples)} samples -> {out}")
