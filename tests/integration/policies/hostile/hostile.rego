# METADATA
# title: Hostile builtins for the engine availability test
# description: |
#   Added beside the default policy. The echo text "<builtin>:<argument>" feeds builtins whose cost
#   grows with their argument values; each rule denies with its own reason whenever it evaluates,
#   so a call is allowed only when no rule applies.
package castellan.gateway

import rego.v1

hostile := split(input.arguments.text, ":") if input.action == "call"

argument := concat(":", array.slice(hostile, 1, count(hostile)))

deny contains sprintf("count=%d", [strings.count(argument, "")]) if hostile[0] == "count"

deny contains sprintf("range=%d", [count(numbers.range(0, to_number(argument)))]) if hostile[0] == "range"

deny contains sprintf("step=%d", [count(numbers.range_step(0, to_number(argument), 1))]) if hostile[0] == "step"

deny contains sprintf("cidr=%d", [count(net.cidr_expand(argument))]) if hostile[0] == "cidr"

deny contains sprintf("width=%d", [count(sprintf("%*d", [to_number(argument), 1]))]) if hostile[0] == "width"

deny contains sprintf("shift=%d", [bits.lsh(1, to_number(argument))]) if hostile[0] == "shift"

deny contains sprintf("replace=%d", [count(replace(argument, "", argument))]) if hostile[0] == "replace"

deny contains sprintf("template=%d", [count(strings.render_template(argument, {"x": numbers.range(1, 99)}))]) if hostile[0] == "template"
