package castellan.gateway_test

import rego.v1

import data.castellan.gateway

base := {
	"identity": {"agent_id": "bot", "subject": "alice", "groups": ["analysts"], "scopes": []},
	"tool": {"name": "echo", "securable": "main.tools.echo", "annotations": {}, "upstream": null},
	"action": "call",
	"arguments": {"text": "hello"},
	"run": {"run_id": "r1", "depth": 0, "calls": 1, "repeats": 1},
	"grants": {"has": ["EXECUTE on main.tools.echo"], "missing": []},
	"budget": {"tokens_used": 0, "tokens_limit": 1000, "calls_this_minute": 1},
	"time": "2026-11-24T00:00:00Z",
}

test_echo_is_allowed if {
	gateway.decision.allow with input as base
}

test_long_text_is_denied if {
	long_text := concat("", [x | some _ in numbers.range(1, 201); x := "x"])
	d := gateway.decision with input as object.union(base, {"arguments": {"text": long_text}})
	d.reasons == {"argument text must be a string of at most 200 characters"}
}

test_text_must_be_a_string if {
	d := gateway.decision with input as object.union(base, {"arguments": {"text": 42}})
	d.reasons == {"argument text must be a string of at most 200 characters"}
}

test_list_ignores_argument_rules if {
	gateway.decision.allow with input as object.union(base, {"action": "list", "arguments": {"text": 42}})
}

test_blocked_words_are_denied_in_any_argument if {
	d := gateway.decision with input as object.union(base, {"arguments": {"text": "Please DROP TABLE users"}})
	d.reasons == {`argument text contains blocked text "drop table"`}
}

test_missing_grants_are_denied if {
	d := gateway.decision with input as object.union(base, {"grants": {"has": [], "missing": ["EXECUTE on main.tools.echo"]}})
	"missing privilege EXECUTE on main.tools.echo" in d.reasons
}

test_destructive_tools_need_admins if {
	reset := object.union(base, {"tool": {"name": "demo.reset", "securable": "main.admin.reset_demo", "annotations": {"destructiveHint": true}, "upstream": null}, "arguments": {}})
	not gateway.decision.allow with input as reset
	gateway.decision.allow with input as object.union(reset, {"identity": {"agent_id": "ops", "subject": "ops", "groups": ["admins"], "scopes": []}})
}

test_group_restricted_tool if {
	clock := object.union(base, {"tool": {"name": "clock.now", "securable": "main.tools.clock_now", "annotations": {}, "upstream": null}, "arguments": {}})
	gateway.decision.allow with input as clock
	d := gateway.decision with input as object.union(clock, {"identity": {"agent_id": "x", "subject": "x", "groups": ["guests"], "scopes": []}})
	not d.allow
}

test_exhausted_budget_is_denied if {
	d := gateway.decision with input as object.union(base, {"budget": {"tokens_used": 1000, "tokens_limit": 1000, "calls_this_minute": 1}})
	d.reasons == {"token budget exhausted"}
}

test_profile_obligations if {
	profile := object.union(base, {"tool": {"name": "demo.profile", "securable": "main.tools.customer_profile", "annotations": {}, "upstream": null}, "arguments": {"customer_id": "c-001"}})
	d := gateway.decision with input as profile
	d.obligations == {"redact_fields": ["email"], "max_result_chars": 2000}
}

# The gateway puts a normalised view of the arguments in input.normalized (NFKC, case-folded,
# zero-width and control characters removed, whitespace collapsed): `arguments` with the same structure,
# `strings` every string at any depth as [argument name, text].
test_blocked_words_are_denied_in_the_normalized_view if {
	hidden := "please DR\u200dOP\u00ad\t\tT\uff21BLE users"
	d := gateway.decision with input as object.union(base, {
		"arguments": {"text": hidden},
		"normalized": {"arguments": {"text": "please drop table users"}, "strings": [["text", "please drop table users"]]},
	})
	d.reasons == {`argument text contains blocked text "drop table"`}
}

test_blocked_words_are_denied_at_any_depth if {
	d := gateway.decision with input as object.union(base, {
		"arguments": {"queries": ["select 1", {"sql": "DROP TABLE x"}]},
		"normalized": {"strings": [["queries", "select 1"], ["queries", "sql"], ["queries", "drop table x"]]},
	})
	`argument queries contains blocked text "drop table"` in d.reasons
}

test_the_normalized_view_alone_is_not_denied_for_harmless_text if {
	gateway.decision.allow with input as object.union(base, {
		"arguments": {"text": "a table for two"},
		"normalized": {"arguments": {"text": "a table for two"}, "strings": [["text", "a table for two"]]},
	})
}

reset_input := object.union(base, {"tool": {"name": "demo.reset", "securable": "main.admin.reset_demo", "annotations": {"destructiveHint": true}, "upstream": null}, "arguments": {}})

reset_approval := {"admin_groups": ["admins"], "tools": {"demo.reset": {"approval": {"groups": ["admins"], "reason": "resets the demo data"}}}}

test_a_destructive_tool_with_approval_waits_for_an_admin if {
	d := gateway.decision with input as reset_input with data.castellan.config as reset_approval
	d.allow
	d.obligations.require_approval == {"groups": ["admins"], "reason": "resets the demo data"}
}

test_an_approver_calls_directly if {
	admin := object.union(reset_input, {"identity": {"agent_id": "ops", "subject": "ops", "groups": ["admins"], "scopes": []}})
	d := gateway.decision with input as admin with data.castellan.config as reset_approval
	d.allow
	not d.obligations.require_approval
}

test_approval_timeout_is_passed_on if {
	config := {"tools": {"echo": {"approval": {"groups": ["leads"], "timeout_seconds": 30}}}}
	d := gateway.decision with input as base with data.castellan.config as config
	d.obligations.require_approval == {"groups": ["leads"], "reason": "echo needs an approver's consent", "timeout_seconds": 30}
}

test_listing_a_tool_that_needs_approval_is_allowed_without_obligation if {
	d := gateway.decision with input as object.union(reset_input, {"action": "list"}) with data.castellan.config as reset_approval
	d.allow
	not d.obligations.require_approval
}

read_input := object.union(base, {
	"version": "v2",
	"action": "read",
	"tool": {"name": "files.readme", "securable": "main.upstream.files__resource__file_readme", "annotations": {}, "upstream": "files"},
	"arguments": {"uri": "file:///srv/readme.md"},
	"resource": {"uri": "file:///srv/readme.md", "name": "readme", "template": null, "mime_type": "text/markdown", "upstream": "files"},
	"grants": {"has": ["READ on main.upstream.files__resource__file_readme"], "missing": []},
})

test_a_resource_read_is_allowed_and_capped if {
	d := gateway.decision with input as read_input
	d.allow
	d.obligations.max_result_chars == 200000
}

test_a_resource_under_a_blocked_prefix_is_denied_listed_or_read if {
	etc := {"uri": "file:///etc/shadow", "name": "shadow", "template": null, "mime_type": null, "upstream": "files"}
	d := gateway.decision with input as object.union(read_input, {"resource": etc, "arguments": {"uri": "file:///etc/shadow"}})
	d.reasons == {"resource file:///etc/shadow is under the blocked prefix file:///etc/"}
	not gateway.decision.allow with input as object.union(read_input, {"action": "list", "resource": etc})
}

test_a_read_without_read_is_denied if {
	d := gateway.decision with input as object.union(read_input, {"grants": {"has": [], "missing": ["READ on main.upstream.files__resource__file_readme"]}})
	"missing privilege READ on main.upstream.files__resource__file_readme" in d.reasons
}

test_prompt_arguments_meet_the_blocked_words_rule_like_tool_arguments if {
	prompt := object.union(base, {
		"version": "v2",
		"action": "prompt",
		"tool": {"name": "files.summarise", "securable": "main.upstream.files__prompt__summarise", "annotations": {}, "upstream": "files"},
		"arguments": {"topic": "drop\u200b  TABLE users"},
		"normalized": {"arguments": {"topic": "drop table users"}, "strings": [["topic", "drop table users"]]},
		"prompt": {"name": "summarise", "upstream": "files"},
	})
	d := gateway.decision with input as prompt
	d.reasons == {`argument topic contains blocked text "drop table"`}
}

test_a_version_one_document_is_decided_as_before if {
	gateway.decision.allow with input as base
	not gateway.decision.obligations.max_result_chars with input as base
}

card_in_result := {"kind": "card_number", "type": "card.visa", "category": "personal_data", "where": "result", "path": "text", "count": 1}

email_in_result := {"kind": "email", "type": "email", "category": "personal_data", "where": "result", "path": "text", "count": 2}

test_card_numbers_in_results_are_masked_and_flagged if {
	d := gateway.decision with input as object.union(base, {"action": "result", "detections": [card_in_result, email_in_result]})
	d.allow
	d.obligations.redact_detections == {"card_number"}
	d.obligations.flags == {"personal_data:card_number", "personal_data:email"}
}

test_personal_data_in_arguments_is_flagged_not_denied if {
	d := gateway.decision with input as object.union(base, {"detections": [object.union(email_in_result, {"where": "arguments"})]})
	d.allow
	d.obligations.flags == {"personal_data:email"}
	not d.obligations.redact_detections
}

test_a_call_without_detections_has_no_flags if {
	d := gateway.decision with input as object.union(base, {"detections": []})
	not d.obligations.flags
}

test_configured_kinds_in_arguments_are_denied if {
	d := gateway.decision with input as object.union(base, {"detections": [object.union(card_in_result, {"where": "arguments", "path": "card"})]})
		with data.castellan.config.guardrails as {"deny_in_arguments": ["card_number"]}
	d.reasons == {"argument card holds a card_number (card.visa)"}
}

relayed := object.union(base, {
	"action": "elicit",
	"tool": {"name": "fx.ask", "securable": "main.upstreams.fx__ask", "annotations": {}, "upstream": "fx"},
	"request": {"method": "elicitation/create", "params": {}, "strings": [["message", "what is your name?"]]},
})

test_relayed_elicitation_allowed if {
	gateway.decision.allow with input as relayed
}

test_upstream_forbidden_to_sample if {
	reasons := gateway.decision.reasons with input as object.union(relayed, {"action": "sample"})
		with data.castellan.config.upstreams as {"fx": {"forbid": ["sample"]}}
	reasons == {"upstream fx may not sample through the agent"}
}

test_elicitation_of_a_secret_denied if {
	doc := object.union(relayed, {"request": {
		"method": "elicitation/create", "params": {},
		"strings": [["requestedSchema", "api key"]],
	}})
	not gateway.decision.allow with input as doc
}
