"""The guests of a compute node: the VMs themselves, as opposed to their disks.

``virtman.guest.domains`` boots, lists, stops and destroys VMs through libvirt (the demo and
the tests use it directly). ``virtman.guest.manager.Guests`` is the node's guest service on
top of it: guests named by z/VM userids, recorded in the node's journal, their root disk a
VMThunder snapshot; ``virtmanserver`` (``virtman/cmd/server.py``) builds it at start and
adopts its running domains. ``virtman.guest.vcenter`` has the same VM verbs on vSphere
through oslo.vmware (docs/vcenter.rst; not wired into the daemon yet). Nothing under
``virtman/`` outside this package imports libvirt, and only the daemon's entry point imports
this package.
"""
