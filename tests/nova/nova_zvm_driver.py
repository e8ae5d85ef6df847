"""Unmodified Nova: ``nova.virt.zvm.driver.ZVMDriver`` against a real node's z/VM API
(``VMT_NOVA_ZVM_URL``), with Nova's own objects and fixtures (``NoDBTestCase``, Glance
fixture) for the rest of Nova. Run by ``tests/functional/test_issue_12_nova_zvm.py``."""

from nova import monkey_patch

monkey_patch.patch()

import hashlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from xml.etree import ElementTree  # noqa: E402

from nova.compute import power_state, task_states  # noqa: E402
from nova.network import model as network_model  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.unit.virt.libvirt import test_driver  # noqa: E402
from nova.virt.zvm import driver as zvm_driver  # noqa: E402

from brick.executor import execute  # noqa: E402
from brick.wait import wait_until  # noqa: E402
from nova import context, objects, test  # noqa: E402
from nova.virt import fake  # noqa: E402

MARKER = os.environ.get("VMT_NOVA_MARKER", "")
VIF_MAC = "52:54:00:5a:00:07"
DISK_MARK = 0x5A  # written into the guest's disk while it is off: free blocks of its ext4
MARK_LEN = 64 << 10


def sha256_marked(path: str) -> str:
    """The sha256 of ``path`` with its last ``MARK_LEN`` bytes set to ``DISK_MARK``: what
    the guest's disk flattened must be once the mark is written through its snapshot."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        left = size - MARK_LEN
        while left:
            chunk = f.read(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
    digest.update(bytes([DISK_MARK]) * MARK_LEN)
    return digest.hexdigest()


class ZVMDriverOnVMThunderTest(test.NoDBTestCase):
    def setUp(self):
        super().setUp()
        self.context = context.get_admin_context()
        self.flags(cloud_connector_url=os.environ["VMT_NOVA_ZVM_URL"], group="zvm")
        self.flags(image_tmp_path=os.environ["VMT_NOVA_IMAGE_DIR"], group="zvm")
        self.flags(instance_name_template="vmt%05x")
        self.flags(my_ip="127.0.0.1")  # nova-compute runs on the node: its images are local
        self.stub_out("nova.objects.Instance.save", lambda *a, **k: None)
        # Nova's config drive needs genisoimage; the tiny guest reads none
        self.stub_out("nova.virt.zvm.utils.generate_configdrive", lambda *a, **k: None)
        self.glance = self.useFixture(nova_fixtures.GlanceFixture(self))
        self.uploaded: dict[str, bytes] = {}
        update = self.glance.update

        def update_keeping_data(context, image_id, metadata, data=None, purge_props=False):
            # The fixture drops the data; Glance would store it. Nova's zvm driver opens the
            # exported file in text mode ("r"): its bytes are read from the file's buffer.
            if data is not None:
                self.uploaded[image_id] = getattr(data, "buffer", data).read()
            return update(context, image_id, metadata, data, purge_props)

        self.glance.update = update_keeping_data  # this test's fixture only
        with open(os.environ["VMT_NOVA_ROOTFS"], "rb") as f:
            data = io.BytesIO(f.read())
        self.image = self.glance.create(
            self.context,
            {
                "name": "tiny",
                "disk_format": "raw",
                "container_format": "bare",
                "status": "active",
                "properties": {"os_distro": "rhel7"},
            },
            data=data,
        )

    def test_spawn_power_verbs_destroy(self):
        drvr = zvm_driver.ZVMDriver(fake.FakeVirtAPI())
        fields_ = test_driver._create_test_instance(image_ref=self.image["id"])
        fields_["config_drive"] = ""
        instance = objects.Instance(**fields_)
        instance.flavor.root_gb = 0
        instance.flavor.memory_mb = 128
        instance.flavor.vcpus = 1
        instance.memory_mb = 128
        instance.vcpus = 1
        image_meta = objects.ImageMeta.from_dict(
            {"id": self.image["id"], "disk_format": "raw", "properties": {"os_distro": "rhel7"}}
        )
        network_info = network_model.NetworkInfo([vif()])
        t0 = time.monotonic()
        drvr.spawn(self.context, instance, image_meta, [], None, {}, network_info=network_info)

        def console():
            text = drvr.get_console_output(self.context, instance) or ""
            return text.decode(errors="replace") if isinstance(text, bytes) else text

        wait_until(
            lambda: MARKER in console(),
            timeout_s=120,
            what="the guest's boot marker",
            max_interval_s=0.2,
        )
        print(f"NOVA-SPAWN-BOOTED-S {time.monotonic() - t0:.2f}", flush=True)
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        self.check_nic(drvr, instance)
        self.assertIn(instance.name.upper(), drvr.list_instances())  # z/VM userids: upper
        resources = drvr.get_available_resource()
        self.assertGreater(resources["vcpus"], 0)
        self.assertIn(resources["hypervisor_type"], ("qemu", "kvm"))
        drvr.reboot(self.context, instance, network_info, "SOFT")  # ACPI: the guest ignores it
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        drvr.pause(instance)
        # Nova's zvm driver maps only "on"/"off"; the node answers "paused" (NOSTATE to Nova)
        self.assertEqual(
            "paused", drvr._hypervisor._reqh.call("guest_get_power_state", instance.name)
        )
        self.assertEqual(power_state.NOSTATE, drvr.get_info(instance).state)
        drvr.unpause(instance)
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        drvr.power_off(instance, timeout=1, retry_interval=1)
        self.assertEqual(power_state.SHUTDOWN, drvr.get_info(instance).state)
        self.mark_disk(drvr, instance)  # what the snapshot below must carry
        drvr.power_on(self.context, instance, [])
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        wait_until(lambda: MARKER in console(), timeout_s=120, what="boot after power on")
        drvr.reboot(self.context, instance, [], "HARD")
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        wait_until(lambda: console().count(MARKER) >= 2, timeout_s=120, what="boot after reboot")
        self.snapshot_and_check(drvr, instance)
        drvr.destroy(self.context, instance)
        self.assertFalse(drvr._hypervisor.guest_exists(instance))

    def check_nic(self, drvr, instance) -> None:
        """Nova's VIF is a virtio NIC of the guest on the node's bridge; its tap a port."""
        lines = drvr._hypervisor._reqh.call("guest_get_definition_info", instance.name)
        root = ElementTree.fromstring("\n".join(lines["user_direct"]))
        [iface] = root.findall("devices/interface")
        bridge = os.environ["VMT_NOVA_BRIDGE"]
        self.assertEqual(
            ("bridge", bridge, VIF_MAC, "virtio"),
            (
                iface.get("type"),
                iface.find("source").get("bridge"),
                iface.find("mac").get("address"),
                iface.find("model").get("type"),
            ),
        )
        tap = iface.find("target").get("dev")
        ports = execute(["ip", "-o", "link", "show", "master", bridge], timeout_s=30).stdout
        self.assertIn(f" {tap}:", ports)
        [row] = drvr._hypervisor._reqh.call("guests_get_nic_info", userid=instance.name)
        self.assertEqual((row["switch"], row["port"]), (bridge, vif()["id"]))

    def mark_disk(self, drvr, instance) -> None:
        """Write ``DISK_MARK`` into the guest's disk (its snapshot, as its definition names
        it) while it is off: its last ``MARK_LEN`` bytes, free blocks of its file system."""
        lines = drvr._hypervisor._reqh.call("guest_get_definition_info", instance.name)
        root = ElementTree.fromstring("\n".join(lines["user_direct"]))
        source = root.find("devices/disk/source")
        path = source.get("file") or source.get("dev")
        fmt = "qcow2" if source.get("file") else "raw"
        size = os.path.getsize(os.environ["VMT_NOVA_ROOTFS"])
        write = f"write -P {DISK_MARK:#x} {size - MARK_LEN} {MARK_LEN}"
        execute(["qemu-io", "-f", fmt, "-c", write, path], timeout_s=120)

    def snapshot_and_check(self, drvr, instance) -> None:
        """Nova's snapshot of the running guest: capture + export on the node, upload to
        Glance; the uploaded bytes are the guest's disk flattened (its image + the mark)."""
        snap = self.glance.create(
            self.context,
            {"name": "snap", "status": "queued", "disk_format": "raw", "container_format": "bare"},
        )
        states = []

        def update_task_state(task_state, expected_state=None):
            states.append(task_state)

        drvr.snapshot(self.context, instance, snap["id"], update_task_state)

        self.assertEqual([task_states.IMAGE_PENDING_UPLOAD, task_states.IMAGE_UPLOADING], states)
        data = self.uploaded[snap["id"]]
        self.assertEqual(os.path.getsize(os.environ["VMT_NOVA_ROOTFS"]), len(data))
        self.assertEqual(bytes([DISK_MARK]) * MARK_LEN, data[-MARK_LEN:])
        self.assertEqual(
            sha256_marked(os.environ["VMT_NOVA_ROOTFS"]), hashlib.sha256(data).hexdigest()
        )
        image = self.glance.show(self.context, snap["id"])
        self.assertEqual(("active", "raw"), (image["status"], image["disk_format"]))
        print(f"NOVA-SNAPSHOT-BYTES {len(data)}", flush=True)
        # the guest was paused for the capture and runs again
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        # Nova removed its export and the captured image from the node
        self.assertFalse(os.path.exists(os.path.join(os.environ["VMT_NOVA_IMAGE_DIR"], snap["id"])))
        self.assertEqual(
            [],
            [
                i["imagename"]
                for i in drvr._hypervisor._reqh.call("image_query")
                if i["imagename"] == snap["id"]
            ],
        )


def vif() -> network_model.VIF:
    """One port of Neutron's, already active (no plug event to wait for)."""
    subnet = network_model.Subnet(
        cidr="192.168.95.0/24",
        gateway=network_model.IP(address="192.168.95.1", type="gateway"),
        ips=[network_model.FixedIP(address="192.168.95.7")],
    )
    return network_model.VIF(
        id="8c1bd1e6-5f1c-4d3a-9c55-3a3b9f0e7a01",
        address=VIF_MAC,
        active=True,
        network=network_model.Network(id="net-1", bridge=None, subnets=[subnet]),
    )
