"""Client of Virtman's XML-RPC API (port 7774, path /RPC2)."""
