"""VMThunder's Nova compute driver: ``[DEFAULT] compute_driver = vmthunder.VMThunderDriver``.

Nova imports compute drivers only as ``nova.virt.<name>``, so this package ships inside
Nova's namespace (the ``vmthunder[nova]`` extra). It imports Nova: nothing in VMThunder's
own packages imports it.
"""

from nova.virt.vmthunder.driver import VMThunderDriver

__all__ = ["VMThunderDriver"]
