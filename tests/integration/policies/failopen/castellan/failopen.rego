# METADATA
# title: The fail-open classes found by the differential run (issue 23)
# description: |
#   Each deny rule is a check a security team writes on tool arguments, over a builtin on which
#   regorus (the embedded engine before the OPA library) decided differently from OPA, most often
#   not denying what OPA denies. The embedded engine must now decide each exactly as OPA, or refuse
#   the policy at load.
package castellan.gateway

import rego.v1

decision := {"allow": count(deny) == 0, "reasons": deny, "obligations": {}}

a := input.arguments

deny contains "s is not one word" if not regex.match(`^\w+$`, a.s)

deny contains "s has a digit" if regex.match(`\d`, a.s)

deny contains "s has a space" if regex.match(`\s`, a.s)

deny contains "s names admin" if contains(lower(a.s), "admin")

deny contains "s shouts STRASSE" if upper(a.s) == "STRASSE"

deny contains "s is long" if count(a.s) > 3

deny contains "ip is internal" if net.cidr_contains("10.0.0.0/8", a.ip)

deny contains "size over 1KB" if units.parse_bytes(a.size) > 1000

deny contains "slice not empty" if count(array.slice([1, 2, 3], a.i, 3)) > 0

deny contains "patch makes admin" if json.patch({"role": "user"}, a.patch).role == "admin"

deny contains "too far ahead" if time.add_date(0, a.years, 0, 0) > 4102444800000000000

deny contains "b64 says admin" if base64.decode(a.b64) == "admin"

deny contains "b64 invalid" if not base64.is_valid(a.b64)

deny contains "j invalid" if not json.is_valid(a.j)

deny contains "query has admin" if urlquery.decode(a.q) == "role=admin&x"

deny contains "version too old" if semver.compare(a.v, "2.0.0") < 0

deny contains "not before 2026" if time.parse_rfc3339_ns(a.t) < 1767225600000000000

deny contains "sum is not 0.3" if a.x + 0.2 != 0.3

deny contains "hash is known" if crypto.sha256(a.s) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

deny contains "token claims admin" if io.jwt.decode(a.jwt)[1].admin == true
