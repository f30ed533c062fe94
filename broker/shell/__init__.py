"""The operators' introspection shell over SSH."""
