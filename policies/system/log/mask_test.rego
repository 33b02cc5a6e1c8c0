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
