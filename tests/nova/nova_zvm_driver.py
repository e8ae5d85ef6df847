"""Unmodified Nova: ``nova.virt.zvm.driver.ZVMDriver`` against a real node's z/VM API
(``VMT_NOVA_ZVM_URL``), with Nova's own objects and fixtures (``NoDBTestCase``, Glance
fixture) for the rest of Nova. Run by ``tests/functional/test_issue_12_nova_zvm.py``."""

from nova import monkey_patch

monkey_patch.patch()

import io  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from nova.compute import power_state  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.unit.virt.libvirt import test_driver  # noqa: E402
from nova.virt.zvm import driver as zvm_driver  # noqa: E402

from brick.wait import wait_until  # noqa: E402
from nova import context, objects, test  # noqa: E402
from nova.virt import fake  # noqa: E402

MARKER = os.environ.get("VMT_NOVA_MARKER", "")


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
        t0 = time.monotonic()
        drvr.spawn(self.context, instance, image_meta, [], None, {}, network_info=[])

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
        drvr.power_on(self.context, instance, [])
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        wait_until(lambda: MARKER in console(), timeout_s=120, what="boot after power on")
        drvr.reboot(self.context, instance, [], "HARD")
        self.assertEqual(power_state.RUNNING, drvr.get_info(instance).state)
        wait_until(lambda: console().count(MARKER) >= 2, timeout_s=120, what="boot after reboot")
        drvr.destroy(self.context, instance)
        self.assertFalse(drvr._hypervisor.guest_exists(instance))
