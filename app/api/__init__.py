"""The HTTP API; every JSON route lives under API_PREFIX."""

API_PREFIX = "/api/v1"
