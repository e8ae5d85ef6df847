"""The guests of a compute node: the VMs themselves, as opposed to their disks.

``virtman.guest.domains`` boots, lists, stops and destroys VMs through libvirt. The storage
daemon (``virtmanserver``: stacks, relays, Volt) does not import it: today only the tests
(``tests/functional/test_vm_boot.py``, ``vmfixtures.py``) use it. It lives in the daemon's
package, in a room of its own, because the guest API that comes next (boot a VM on the disk
``create`` returned) will be served by the daemon; nothing under ``virtman/`` outside this
package may import libvirt.
"""
