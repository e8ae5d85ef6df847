"""Virtman: the per-node daemon that builds each image's block stack and the VMs' snapshots."""
