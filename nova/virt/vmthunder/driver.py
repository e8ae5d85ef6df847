"""``VMThunderDriver``: Nova's libvirt driver whose root disks are VMThunder snapshots.

Only the image backend and the cleanup change: spawn clones through ``Virtman.create()``
(see ``imagebackend``); destroy (``_cleanup`` with ``cleanup_instance_disks``) releases the
snapshot with ``Virtman.destroy()``. The node's ``Virtman`` is made once per process from
``[vmthunder] config_file`` (VMThunder's node configuration).
"""

from __future__ import annotations

import threading
from typing import Any

from nova.virt.libvirt import driver as libvirt_driver
from oslo_config import cfg
from oslo_log import log as logging

from nova import exception
from nova.virt.vmthunder import imagebackend

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
CONF.register_opts(
    [
        cfg.StrOpt(
            "config_file",
            default="/etc/virtman/virtman.conf",
            help="VMThunder node configuration read by the Virtman this driver makes",
        )
    ],
    group="vmthunder",
)

_lock = threading.Lock()
_virtman: Any = None


def virtman() -> Any:
    """The process's ``Virtman`` (the original's ``Virtman(openstack_compatible=True)``)."""
    global _virtman
    with _lock:
        if _virtman is None:
            _virtman = make_virtman(CONF.vmthunder.config_file)
        return _virtman


def make_virtman(config_file: str) -> Any:
    """A ``Virtman`` from VMThunder's node configuration file, parsed into a private
    ``ConfigOpts``: Nova's global ``CONF`` is parsed already and keeps its values."""
    from virtman import conf as vconf
    from virtman.compute import Virtman
    from virtman.drivers import load_driver

    private = cfg.ConfigOpts()
    for group, opts in vconf.list_opts():
        private.register_opts(opts, group=None if group == "DEFAULT" else group)
    private([], project="virtman", default_config_files=[config_file])
    settings = vconf.Settings.from_conf(private, private.host_ip or vconf.detect_host_ip())
    return Virtman(settings=settings, driver=load_driver(private.driver, settings))


def use_virtman(instance: Any) -> None:
    """Hand the driver a ``Virtman`` made elsewhere (tests, an embedding process)."""
    global _virtman
    with _lock:
        _virtman = instance


imagebackend.VMThunderImage.virtman_of = staticmethod(virtman)


class VMThunderDriver(libvirt_driver.LibvirtDriver):
    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self.image_backend = imagebackend.Backend(CONF.use_cow_images)

    def _cleanup(
        self,
        context,
        instance,
        network_info,
        block_device_info=None,
        destroy_vifs=True,
        cleanup_instance_dir=False,
        cleanup_instance_disks=False,
        destroy_secrets=True,
    ):
        super()._cleanup(
            context,
            instance,
            network_info,
            block_device_info=block_device_info,
            destroy_vifs=destroy_vifs,
            cleanup_instance_dir=cleanup_instance_dir,
            cleanup_instance_disks=cleanup_instance_disks,
            destroy_secrets=destroy_secrets,
        )
        if cleanup_instance_disks:
            self.release_snapshot(instance)

    def release_snapshot(self, instance) -> None:
        result = virtman().destroy(instance.name)
        code, _, info = result.partition(":")
        if code == "2":
            raise exception.NovaException(f"VMThunder: releasing {instance.name}: {info}")
        LOG.info("VMThunder snapshot of %s released (%s)", instance.name, result)
