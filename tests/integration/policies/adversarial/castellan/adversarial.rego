# METADATA
# title: Adversarial policy for the engine differential test
# description: Every rule turns one Rego corner (cross-type ordering, number formatting, unicode,
#   builtins on odd values) into a reason string, so any disagreement between engines shows.
package castellan.gateway

import rego.v1

decision := {"allow": count(deny) == 0, "reasons": deny, "obligations": obligations}

args := input.arguments

deny contains "n>100" if args.n > 100

deny contains "n<false" if args.n < false

deny contains "n>=null" if args.n >= null

deny contains "n==1" if args.n == 1

deny contains "n==1.0" if args.n == 1.0

deny contains "n<\"a\"" if args.n < "a"

deny contains "n in mixed" if args.n in [1, "1", 1.5, null, true, {"a": 1}, [1]]

deny contains sprintf("type=%s", [type_name(args.n)]) if "n" in object.keys(args)

deny contains sprintf("v=%v", [args.n]) if is_number(args.n)

deny contains sprintf("half=%v", [args.n / 2]) if is_number(args.n)

deny contains sprintf("round=%v", [round(args.n)]) if is_number(args.n)

deny contains sprintf("abs=%v", [abs(args.n)]) if is_number(args.n)

deny contains sprintf("len=%d", [count(args.s)]) if is_string(args.s)

deny contains sprintf("lower=%s", [lower(args.s)]) if is_string(args.s)

deny contains sprintf("upper=%s", [upper(args.s)]) if is_string(args.s)

deny contains sprintf("trim=%s", [trim_space(args.s)]) if is_string(args.s)

deny contains sprintf("split=%v", [split(args.s, ",")]) if is_string(args.s)

deny contains "startswith-ab" if startswith(args.s, "ab")

deny contains "contains-drop" if contains(lower(args.s), "drop")

deny contains "lowercase-word" if regex.match(`^[a-z]+$`, args.s)

deny contains sprintf("num=%v", [to_number(args.s)]) if is_string(args.s)

deny contains sprintf("list-count=%d", [count(args.list)]) if is_array(args.list)

deny contains sprintf("sorted=%v", [sort(args.list)]) if is_array(args.list)

deny contains sprintf("max=%v", [max(args.list)]) if is_array(args.list)

deny contains sprintf("sum=%v", [sum(args.list)]) if {
	is_array(args.list)
	every x in args.list { is_number(x) }
}

deny contains sprintf("keys=%v", [sort(object.keys(args))]) if count(args) > 3

deny contains sprintf("json=%s", [json.marshal(args.obj)]) if is_object(args.obj)

deny contains sprintf("group=%s", [g]) if {
	some g in input.identity.groups
	startswith(g, "adm")
}

deny contains sprintf("depth=%d", [input.run.depth]) if input.run.depth > 3

deny contains "many calls" if input.run.calls >= input.run.repeats * 10

deny contains "over budget" if input.budget.tokens_used > input.budget.tokens_limit

obligations["max_result_chars"] := args.cap if {
	is_number(args.cap)
	args.cap > 0
}
