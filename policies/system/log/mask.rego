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

# The normalised views hold the same values: `arguments` by name, and `strings` (every string at any
# depth) as a whole, since any of its entries may come from a secret argument.
mask contains concat("", ["/input/normalized/arguments/", name]) if {
	some name, _ in input.input.normalized.arguments
	lower(name) in secret_argument_names
}

mask contains "/input/normalized/strings" if {
	some entry in input.input.normalized.strings
	lower(entry[0]) in secret_argument_names
}
