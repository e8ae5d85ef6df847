"""Host block plumbing: iSCSI initiator and targets, device-mapper, qemu-storage-daemon."""
