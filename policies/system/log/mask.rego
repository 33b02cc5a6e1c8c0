# METADATA
# title: Decision-log masking
# description: |
#   What never reaches a decision log, whichever engine decided. Strings are JSON pointers
#   to erase; {"op": "upsert", ...} objects replace a value.
package system.log

import rego.v1

secret_argument_names := {"password", "secret", "token", "api_key", "apikey", "authorization"}

# METADATA
# entrypoint: true
mask contains concat("", ["/input/arguments/", name]) if {
	some name, _ in input.input.arguments
	lower(name) in secret_argument_names
}
