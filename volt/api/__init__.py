"""Volt's REST API (v1, wire-compatible with the original) as a WSGI application."""
