"""The kernel driver: open-iscsi paths, dm-multipath, a bcache cache, LIO relays, dm snapshots."""
