"""A node REST API in the z/VM Cloud Connector's shape (seed 004; docs/zvm-api.rst)."""
