"""Volt: the master that arranges, per image, the tree of nodes that cache and relay it."""
