"""``VMThunderDriver``: Nova's libvirt driver whose root disks are VMThunder snapshots.

Only the image backend, the cleanup and the snapshot change: spawn clones through
``Virtman.create()`` (see ``imagebackend``); destroy (``_cleanup`` with
``cleanup_instance_disks``) releases the snapshot with ``Virtman.destroy()``; a Nova snapshot
is a VMThunder capture (a new base image this node exports) uploaded to Glance. The node's
``Virtman`` is made once per process from ``[vmthunder] config_file`` (VMThunder's node
configuration), with the node's image service for its captures.
"""

from __future__ import annotations

import threading
from typing import Any

from nova.compute import power_state, task_states
from nova.virt.libvirt import driver as libvirt_driver
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import excutils

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
    from virtman import imageservice
    from virtman.compute import Virtman
    from virtman.drivers import load_driver

    private = cfg.ConfigOpts()
    for group, opts in vconf.list_opts():
        private.register_opts(opts, group=None if group == "DEFAULT" else group)
    private([], project="virtman", default_config_files=[config_file])
    settings = vconf.Settings.from_conf(private, private.host_ip or vconf.detect_host_ip())
    made = Virtman(settings=settings, driver=load_driver(private.driver, settings))
    made.image_service = imageservice.of_node(made, private)  # where captures are exported
    return made


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

    def snapshot(self, context, instance, image_id, update_task_state):
        """Nova's snapshot as a VMThunder capture: the instance's disk (its image + its
        writes) flattened into the new base image ``volume-<image_id>`` this node exports,
        then uploaded to Glance with its location (``vmthunder_target_*``), so that the
        snapshot's instances on other nodes clone it through the tree from this node.
        An upload that fails discards the capture."""
        from virtman import capture

        try:
            guest = self._host.get_guest(instance)
        except exception.InstanceNotFound:
            raise exception.InstanceNotRunning(instance_id=instance.uuid) from None
        snapshot = self._image_api.get(context, image_id)
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        captured = self._capture(guest, instance, str(image_id))
        metadata = self._create_snapshot_metadata(
            instance.image_meta, instance, "raw", snapshot["name"]
        )
        metadata["properties"].update(imagebackend.properties_of(captured.connection))
        update_task_state(
            task_state=task_states.IMAGE_UPLOADING,
            expected_state=task_states.IMAGE_PENDING_UPLOAD,
        )
        try:
            with open(captured.path, "rb") as data:
                self._image_api.update(context, image_id, metadata, data, purge_props=False)
        except Exception:
            with excutils.save_and_reraise_exception():
                LOG.error("VMThunder snapshot %s of %s: upload failed", image_id, instance.name)
                capture.discard(virtman().image_service, captured)
        LOG.info(
            "VMThunder snapshot %s of %s: captured (%d bytes, %s) and uploaded",
            image_id,
            instance.name,
            captured.size,
            captured.connection["target_iqn"],
        )

    def _capture(self, guest, instance, image_id: str) -> Any:
        """``Virtman.capture_image`` with the guest paused if it runs (the capture reads a
        quiesced disk), resumed after, also when the capture fails."""
        from virtman.errors import VirtmanError

        running = guest.get_power_state(self._host) == power_state.RUNNING
        if running:
            guest.pause()
        try:
            return virtman().capture_image(instance.name, image_id)
        except VirtmanError as err:
            raise exception.NovaException(f"VMThunder: snapshot of {instance.name}: {err}") from err
        finally:
            if running:
                guest.resume()
