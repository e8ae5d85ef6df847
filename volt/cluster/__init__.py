"""The cluster controller: bursts of VMs placed on Virtman nodes (docs/cluster.rst)."""
