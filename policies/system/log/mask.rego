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
mask contains sprintf("/input/arguments/%s", [name]) if {
	some name, _ in input.input.arguments
	lower(name) in secret_argument_names
}

# The normalised view (input.normalized.arguments) holds the same values.
mask contains sprintf("/input/normalized/arguments/%s", [name]) if {
	some name, _ in input.input.normalized.arguments
	lower(name) in secret_argument_names
}
