"""Volt's REST API (v1, wire-compatible with the original) as an RSGI application (Granian)."""
