"""Nova's own unit-test fixtures (fake libvirt, ``NoDBTestCase``, Glance fixture) around a
real Virtman stack: ``nova.virt.vmthunder.VMThunderDriver`` spawns an instance whose root disk
is the VMThunder snapshot and destroy releases it.

Run with ``python -m testtools.run`` (Nova's tests are not pytest-clean), by
``tests/functional/test_issue_12_nova.py``, which starts the image server and volt-api and
passes them in ``VMT_NOVA_VIRTMAN_CONF`` (a node configuration) and ``VMT_NOVA_CONNECTION``
(the image's iSCSI connection, JSON).
"""

# Nova's concurrency mode is chosen before anything imports eventlet (os_vif would):
# native threading when OS_NOVA_DISABLE_EVENTLET_PATCHING=1, as the functional test runs it.
from nova import monkey_patch

monkey_patch.patch()

import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402
from xml.etree import ElementTree  # noqa: E402

import fixtures  # noqa: E402
import os_vif  # noqa: E402
from nova.network import model as network_model  # noqa: E402
from nova.objects import fields  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.fixtures import libvirt as fakelibvirt  # noqa: E402
from nova.tests.unit.virt.libvirt import test_driver  # noqa: E402

from nova import context, objects, test  # noqa: E402
from nova.virt import fake  # noqa: E402
from nova.virt.vmthunder import driver as vmt_driver  # noqa: E402

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

    def test_spawn_disk_is_the_snapshot_destroy_releases_it(self):
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
