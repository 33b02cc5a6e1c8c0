package system.log_test

import rego.v1

import data.system.log

test_secret_arguments_are_masked if {
	masked := log.mask with input as {"input": {"arguments": {"password": "x", "API_KEY": "y", "text": "z"}}}
	masked == {"/input/arguments/password", "/input/arguments/API_KEY"}
}

test_nothing_to_mask if {
	count(log.mask) == 0 with input as {"input": {"arguments": {"text": "z"}}}
}

test_the_normalized_view_is_masked_too if {
	masked := log.mask with input as {"input": {
		"arguments": {"token": "x", "text": "z"},
		"normalized": {"arguments": {"token": "x", "text": "z"}},
	}}
	masked == {"/input/arguments/token", "/input/normalized/arguments/token"}
}
