# METADATA
# title: Castellan gateway policy
# description: |
#   Decides every governed act: a tools/call (input.action == "call"), every entry of a list
#   (input.action == "list": tools, resources, templates, prompts), a resources/read ("read"),
#   a prompts/get ("prompt"), a completion/complete ("complete"), and what an upstream relays to
#   the agent during a call. The decision input is documented in
#   server/policy/schema/decision-input.v2.json and docs/protocol.md. Per-tool settings live in
#   config/data.json beside this file (data.castellan.config.tools; a resource or prompt is
#   configured there under the name it is served as), resource rules under
#   data.castellan.config.resources.
package castellan.gateway

import rego.v1

# METADATA
# title: The decision the gateway reads
# entrypoint: true
decision := {
	"allow": count(deny) == 0,
	"reasons": deny,
	"obligations": obligations,
}

tool_config := object.get(object.get(data.castellan.config, "tools", {}), input.tool.name, {})

admin_groups := object.get(data.castellan.config, "admin_groups", ["admins"])

# Reasons are formatted with %v only: the embedded engine's fallback without the OPA library
# (regorus, verified subset) formats %s of a number, %d of a string and %q differently from OPA.

# Belt and braces: the grants stage already denies a call with missing privileges.
deny contains sprintf("missing privilege %v", [p]) if {
	some p in input.grants.missing
}

# A tool may be restricted to some groups.
deny contains sprintf("tool %v is restricted to groups: %v", [input.tool.name, concat(", ", tool_config.groups)]) if {
	is_array(tool_config.groups)
	not in_any_group(tool_config.groups)
}

# Destructive tools (MCP annotation destructiveHint) only for admins, or with an approver's consent
# where the tool's config asks for approval (below).
deny contains sprintf("tool %v is destructive: only groups %v may call it", [input.tool.name, concat(", ", admin_groups)]) if {
	input.tool.annotations.destructiveHint == true
	not in_any_group(admin_groups)
	not needs_approval
}

# Human approval (docs/approvals.md): tools.<name>.approval = {"groups": [...], "reason": "...",
# "timeout_seconds": n}. Members of the approver groups (default: admin_groups) call the tool directly;
# anyone else's call waits until one of them approves it, and is denied if nobody does in time.
approval := tool_config.approval if is_object(tool_config.approval)

approvers := object.get(approval, "groups", admin_groups)

needs_approval if {
	approval
	not in_any_group(approvers)
}

approval_reason := object.get(approval, "reason", sprintf("%v needs an approver's consent", [input.tool.name]))

obligations["require_approval"] := {"groups": approvers, "reason": approval_reason, "timeout_seconds": approval.timeout_seconds} if {
	input.action == "call"
	needs_approval
	approval_timeout
}

obligations["require_approval"] := {"groups": approvers, "reason": approval_reason} if {
	input.action == "call"
	needs_approval
	not approval_timeout
}

approval_timeout if is_number(approval.timeout_seconds)

# Acts whose arguments the agent writes, checked alike: a tool call's arguments, a prompt's
# arguments, the text a completion is asked for.
takes_arguments if input.action == "call"

takes_arguments if input.action == "prompt"

takes_arguments if input.action == "complete"

# Acts metered against the identity's token budget.
metered if input.action == "call"

metered if input.action == "read"

metered if input.action == "prompt"

resource_config := object.get(data.castellan.config, "resources", {})

# Resources under a blocked URI prefix are neither listed nor read.
deny contains sprintf("resource %v is under the blocked prefix %v", [input.resource.uri, prefix]) if {
	some prefix in object.get(resource_config, "blocked_prefixes", [])
	startswith(input.resource.uri, prefix)
}

in_any_group(groups) if {
	some g in groups
	g in input.identity.groups
}

# Argument constraints, checked with explicit types: a wrongly typed value is denied, never coerced.
deny contains sprintf("argument %v must be a string of at most %v characters", [name, limit]) if {
	takes_arguments
	some name, limit in object.get(tool_config, "max_length", {})
	value := object.get(input.arguments, name, "")
	not short_string(value, limit)
}

short_string(value, limit) if {
	is_string(value)
	count(value) <= limit
}

# Blocked text in the arguments as given (top level), and at any depth in the gateway's normalised view
# (input.normalized.strings: every string, NFKC, case-folded, zero-width and control characters removed,
# whitespace collapsed), so nesting, spacing, invisible or full-width characters do not hide a word.
# Write blocked_words as the view has them: lower case, single spaces.
deny contains sprintf("argument %v contains blocked text \"%v\"", [name, word]) if {
	takes_arguments
	some name, value in input.arguments
	is_string(value)
	some word in blocked_words
	contains(lower(value), word)
}

deny contains sprintf("argument %v contains blocked text \"%v\"", [name, word]) if {
	takes_arguments
	some entry in object.get(input, ["normalized", "strings"], [])
	name := entry[0]
	some word in blocked_words
	contains(entry[1], word)
}

blocked_words := {lower(w) | some w in object.get(data.castellan.config, "blocked_words", [])}

# The meter enforces budgets too; policy can be stricter for some tools.
deny contains "token budget exhausted" if {
	metered
	input.budget.tokens_limit > 0
	input.budget.tokens_used >= input.budget.tokens_limit
}

obligations["redact_fields"] := tool_config.redact if is_array(tool_config.redact)

obligations["max_result_chars"] := tool_config.max_result_chars if is_number(tool_config.max_result_chars)

# A read's contents are capped like a tool result (a resource's own entry in tools wins).
obligations["max_result_chars"] := resource_config.max_result_chars if {
	input.action == "read"
	is_number(resource_config.max_result_chars)
	not is_number(object.get(tool_config, "max_result_chars", null))
}

# Content guardrails (docs/guardrails.md). input.detections lists what the gateway found in the
# arguments (action "call") or, in the after-call decision, in the tool's result (action "result"):
# each with kind, type, category (personal_data or secret), where, path and count; never the value.
# Settings in config/data.json: guardrails.deny_in_arguments, guardrails.redact_in_results (and a
# tool's own deny_in_arguments).
guardrails := object.get(data.castellan.config, "guardrails", {})

deny_in_arguments contains kind if {
	some kind in object.get(guardrails, "deny_in_arguments", [])
}

deny_in_arguments contains kind if {
	some kind in object.get(tool_config, "deny_in_arguments", [])
}

deny contains sprintf("argument %v holds a %v (%v)", [d.path, d.kind, d.type]) if {
	input.action == "call"
	some d in input.detections
	d.kind in deny_in_arguments
}

redact_in_results := {k | some k in object.get(guardrails, "redact_in_results", ["card_number", "secret"])}

# Card numbers and secrets in a result are masked before the agent sees it.
obligations["redact_detections"] := kinds if {
	input.action == "result"
	kinds := {d.kind | some d in input.detections; d.kind in redact_in_results}
	count(kinds) > 0
}

# Everything found is flagged in the audit record: personal_data:email, secret:secret, ...
obligations["flags"] := flags if {
	flags := {sprintf("%v:%v", [d.category, d.kind]) | some d in input.detections}
	count(flags) > 0
}

# Requests an upstream relays to the agent during a call (input.action sample, elicit or roots; the
# request is input.request, the upstream input.tool.upstream). config.upstreams.<name>.forbid lists
# the actions an upstream may not take, e.g. ["sample"] so it cannot spend the agent's model.
relayed_actions := {"sample", "elicit", "roots"}

upstream_config := object.get(object.get(data.castellan.config, "upstreams", {}), input.tool.upstream, {})

deny contains sprintf("upstream %v may not %v through the agent", [input.tool.upstream, input.action]) if {
	input.action in relayed_actions
	input.action in object.get(upstream_config, "forbid", [])
}

# An elicitation may not ask the agent's user for a secret: no requested field or message text may
# name one (config.elicit_secret_words, matched in the normalised view of the request).
deny contains sprintf("upstream %v may not elicit secrets (%v)", [input.tool.upstream, word]) if {
	input.action == "elicit"
	some entry in input.request.strings
	some word in elicit_secret_words
	contains(entry[1], word)
}

elicit_secret_words := {lower(w) | some w in object.get(data.castellan.config, "elicit_secret_words", [])}
