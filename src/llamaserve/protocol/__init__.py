"""Pydantic models of the HTTP API: requests, responses, errors."""
