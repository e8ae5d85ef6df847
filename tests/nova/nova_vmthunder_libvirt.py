"""Nova's own unit-test fixtures (fake libvirt, ``NoDBTestCase``, Glance fixture) around a
real Virtman stack: ``nova.virt.vmthunder.VMThunderDriver`` spawns an instance whose root disk
is the VMThunder snapshot and destroy releases it; Nova's snapshot of it is a capture (a new
base image the node exports) uploaded to Glance, and a failed upload discards the capture.

Run with ``python -m testtools.run`` (Nova's tests are not pytest-clean), by
``tests/functional/test_issue_12_nova.py``, which starts the image server and volt-api and
passes them in ``VMT_NOVA_VIRTMAN_CONF`` (a node configuration) and ``VMT_NOVA_CONNECTION``
(the image's iSCSI connection, JSON) and ``VMT_NOVA_IMAGE_FILE`` (the image's file).
"""

# Nova's concurrency mode is chosen before anything imports eventlet (os_vif would):
# native threading when OS_NOVA_DISABLE_EVENTLET_PATCHING=1, as the functional test runs it.
from nova import monkey_patch

monkey_patch.patch()

import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from xml.etree import ElementTree  # noqa: E402

import fixtures  # noqa: E402
import os_vif  # noqa: E402
from nova.compute import power_state, task_states  # noqa: E402
from nova.network import model as network_model  # noqa: E402
from nova.objects import fields  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.fixtures import libvirt as fakelibvirt  # noqa: E402
from nova.tests.unit.virt.libvirt import test_driver  # noqa: E402

from brick.executor import execute  # noqa: E402
from nova import context, objects, test  # noqa: E402
from nova.virt import fake  # noqa: E402
from nova.virt.vmthunder import driver as vmt_driver  # noqa: E402

MARK, MARK_LEN = 0x5A, 64 << 10  # written through the instance's disk before its snapshot

# The node's stack is real: it reads /sys (block devices, read-ahead), which Nova's
# SysFsPoisonFixture forbids to code under test that should have been mocked.
REAL_FS = {
    "os.path.isdir": os.path.isdir,
    "builtins.open": open,
    "glob.iglob": glob.iglob,
    "os.listdir": os.listdir,
    "glob.glob": glob.glob,
}


class VMThunderLibvirtDriverTest(test.NoDBTestCase):
    REQUIRES_LOCKING = True

    def setUp(self):
        super().setUp()
        for name, real in REAL_FS.items():
            self.useFixture(fixtures.MonkeyPatch(name, real))
        self.context = context.get_admin_context()
        temp_dir = self.useFixture(fixtures.TempDir()).path
        self.flags(instances_path=temp_dir)
        self.flags(snapshots_directory=temp_dir, group="libvirt")
        self.flags(config_file=os.environ["VMT_NOVA_VIRTMAN_CONF"], group="vmthunder")
        os_vif.initialize()
        self.libvirt = self.useFixture(nova_fixtures.LibvirtFixture())
        self.useFixture(nova_fixtures.CGroupsFixture())
        self.stub_out(
            "nova.objects.InstanceList.get_by_host",
            lambda *a, **k: objects.InstanceList(objects=[]),
        )
        self.stub_out("nova.objects.Instance.save", lambda *a, **k: None)  # no database
        self.stub_out(  # device tags (virtual interfaces) live in the database
            "nova.virt.libvirt.driver.LibvirtDriver._build_device_metadata",
            lambda *a, **k: None,
        )
        self.stub_out(  # no compute manager here to take the lifecycle events
            "nova.virt.libvirt.host.Host._event_emit_delayed", lambda *a, **k: None
        )
        self.stub_out(  # as Nova's own spawn tests: it reads block device mappings
            "nova.virt.libvirt.driver.LibvirtDriver._register_undefined_instance_details",
            lambda *a, **k: None,
        )
        self.libvirt.mock_uname.return_value = fakelibvirt.os_uname(
            "Linux", "", "5.4.0-0-generic", "", fields.Architecture.X86_64
        )
        self.glance = self.useFixture(nova_fixtures.GlanceFixture(self))
        self.uploaded: dict[str, bytes] = {}
        self.upload_fails = False
        update = self.glance.update

        def update_keeping_data(context, image_id, metadata, data=None, purge_props=False):
            # The fixture drops the data; Glance would store it.
            if self.upload_fails:
                raise OSError("Glance is unreachable (the test says so)")
            if data is not None:
                self.uploaded[image_id] = data.read()
            return update(context, image_id, metadata, data, purge_props)

        self.glance.update = update_keeping_data  # this test's fixture only
        connection = json.loads(os.environ["VMT_NOVA_CONNECTION"])
        self.image = self.glance.create(
            self.context,
            {
                "name": "vmt-image",
                "disk_format": "raw",
                "container_format": "bare",
                "status": "active",
                "properties": {
                    "vmthunder_target_portal": connection["target_portal"],
                    "vmthunder_target_iqn": connection["target_iqn"],
                    "vmthunder_target_lun": str(connection["target_lun"]),
                },
            },
        )
        self.virtman = vmt_driver.virtman()  # the real node stack, from the configuration
        self.addCleanup(vmt_driver.use_virtman, None)
        self.addCleanup(self.virtman.shutdown)
        self.addCleanup(self._release_left)

    def _release_left(self):
        """A failed test leaves no disk (and so no daemon) behind."""
        for entry in self.virtman.list():
            self.virtman.destroy(entry.split(":")[0])

    def _spawn(self):
        drvr = vmt_driver.VMThunderDriver(fake.FakeVirtAPI(), False)
        fields_ = test_driver._create_test_instance(image_ref=self.image["id"])
        fields_["root_gb"] = 0
        fields_["config_drive"] = ""
        fields_["info_cache"] = objects.InstanceInfoCache(network_info=network_model.NetworkInfo())
        instance = objects.Instance(**fields_)
        instance.flavor.root_gb = 0
        instance.flavor.ephemeral_gb = 0
        image_meta = objects.ImageMeta.from_dict({"disk_format": "raw", "id": self.image["id"]})

        drvr.spawn(self.context, instance, image_meta, [], None, {}, network_info=[])
        return drvr, instance

    def test_spawn_disk_is_the_snapshot_destroy_releases_it(self):
        drvr, instance = self._spawn()

        [entry] = self.virtman.list()
        self.assertEqual(f"{instance.name}:volume-{self.image['id']}", entry)
        path = self.virtman.journal.instances()[instance.name]["path"]
        self.assertTrue(Path(path).exists())
        guest = drvr._host.get_guest(instance)
        root = ElementTree.fromstring(guest.get_xml_desc())
        disk = root.find("devices/disk[@device='disk']")
        source = disk.find("source")
        self.assertEqual(path, source.get("file") or source.get("dev"))
        self.assertEqual(
            ("file", "qcow2") if source.get("file") else ("block", "raw"),
            (disk.get("type"), disk.find("driver").get("type")),
        )
        print(f"NOVA-IMAGE {self.image['id']}", flush=True)
        disk_xml = " ".join(ElementTree.tostring(disk).decode().split())
        print(f"NOVA-DISK {disk_xml}", flush=True)

        drvr.destroy(self.context, instance, [], block_device_info=None, destroy_disks=True)

        self.assertEqual([], self.virtman.list())
        self.assertFalse(Path(path).exists())
        self.assertEqual({}, self.virtman.journal.instances())

    def test_snapshot_is_a_capture_uploaded(self):
        drvr, instance = self._spawn()
        path = self.virtman.journal.instances()[instance.name]["path"]
        fmt = "raw" if path.startswith("/dev/") else "qcow2"
        size = os.path.getsize(os.environ["VMT_NOVA_IMAGE_FILE"])
        execute(["qemu-io", "-f", fmt, "-c", f"write -P {MARK:#x} {size - MARK_LEN} {MARK_LEN}",
                 path], timeout_s=60)  # fmt: skip
        snap = self._snapshot_image("snap")
        states = []

        drvr.snapshot(
            self.context, instance, snap, lambda task_state, **_: states.append(task_state)
        )

        self.assertEqual([task_states.IMAGE_PENDING_UPLOAD, task_states.IMAGE_UPLOADING], states)
        target = f"volume-{snap}"
        service = self.virtman.image_service
        self.addCleanup(service.destroy_image_target, target)
        with open(os.environ["VMT_NOVA_IMAGE_FILE"], "rb") as f:
            expected = f.read()[: size - MARK_LEN] + bytes([MARK]) * MARK_LEN
        data = self.uploaded[snap]  # the instance's disk flattened: its image + its write
        self.assertEqual(hashlib.sha256(expected).hexdigest(), hashlib.sha256(data).hexdigest())
        props = self.glance.show(self.context, snap)["properties"]
        self.assertEqual(
            f"{self.virtman.settings.iqn_prefix}{target}", props["vmthunder_target_iqn"]
        )
        self.assertEqual(
            f"{self.virtman.settings.host_ip}:{self.virtman.settings.iscsi_port}",
            props["vmthunder_target_portal"],
        )
        self.assertIn(target, service.list_image_target())  # other nodes boot it from here
        captured = Path(service.image_dirs[0]) / f"{target}.raw"
        self.addCleanup(captured.unlink, missing_ok=True)
        self.assertEqual(data, captured.read_bytes())
        guest = drvr._host.get_guest(instance)
        self.assertEqual(power_state.RUNNING, guest.get_power_state(drvr._host))  # resumed
        print(f"NOVA-CAPTURED {target} {len(data)} bytes", flush=True)

        # an upload that fails discards its capture: no target, no file
        self.upload_fails = True
        failed = self._snapshot_image("snap2")
        self.assertRaises(OSError, drvr.snapshot, self.context, instance, failed, lambda **_: None)
        self.assertNotIn(f"volume-{failed}", service.list_image_target())
        self.assertFalse((Path(service.image_dirs[0]) / f"volume-{failed}.raw").exists())
        self.assertEqual(power_state.RUNNING, guest.get_power_state(drvr._host))

        drvr.destroy(self.context, instance, [], block_device_info=None, destroy_disks=True)
        self.assertEqual([], self.virtman.list())

    def _snapshot_image(self, name):
        """The image Nova's compute API makes before it calls the driver's snapshot."""
        meta = {"name": name, "status": "queued", "disk_format": "raw", "container_format": "bare"}
        return self.glance.create(self.context, meta)["id"]
