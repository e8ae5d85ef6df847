"""The options of the guests a node serves (oslo.config): libvirt domains, the z/VM Cloud
Connector API (virtman/zvm/) and the vSphere backend. ``virtman.conf`` registers them with
the rest; they live apart because they are most of the node's options (and the guest code
in virtman/guest/ stays out of the stack's imports).
"""

from __future__ import annotations

from oslo_config import cfg

# The guests virtmanserver owns (virtman/guest/manager.py): how their domains boot.
guest_opts: list[cfg.Opt] = [
    cfg.StrOpt(
        "guest_backend",
        default="libvirt",
        choices=["libvirt", "vcenter"],
        help="Where the guests run. libvirt: domains on this host (guest_libvirt_uri). "
        "vcenter: VMs of the vCenter in [vcenter], each on its VMThunder snapshot exported "
        "by this node over iSCSI as a raw device mapping (docs/vcenter.rst).",
    ),
    cfg.StrOpt(
        "guest_libvirt_uri",
        default="qemu:///system",
        help="libvirt URI of the guests' domains (QEMU; TCG unless /dev/kvm is usable).",
    ),
    cfg.StrOpt(
        "guest_kernel",
        help="Kernel every guest boots directly (libvirt <kernel>); its root disk is its "
        "VMThunder snapshot (/dev/vda). Unset: deploy is refused.",
    ),
    cfg.StrOpt("guest_initrd", help="Initramfs of guest_kernel. Unset: deploy is refused."),
    cfg.ListOpt(
        "guest_image_servers",
        default=[],
        help="Image servers (host or host:port of their iSCSI portal, default port 3260) a "
        "guest's deploy reads an image from when this node does not export it itself: "
        "through Volt's tree of the image, as any instance. Empty: only images this node "
        "exports can be deployed.",
    ),
    cfg.StrOpt(
        "guest_cmdline",
        default="root=/dev/vda console=ttyS0 ro panic=-1",
        help="Kernel command line of the guests (console on ttyS0: console_output).",
    ),
    cfg.StrOpt(
        "guest_name_prefix",
        default="guest-",
        regex=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,23}$",
        help="A guest's instance (and snapshot) name is this prefix + its userid; its "
        "domain is vmt-<instance>. Domains of ours with this prefix and no journal record "
        "are reported as orphans at start, never destroyed. Nodes between which guests "
        "live-migrate must use the same prefix (a domain keeps its name).",
    ),
    cfg.StrOpt(
        "guest_migration_uri",
        help="libvirt URI through which other nodes' virtmanservers reach this node's "
        "libvirtd to live-migrate a guest here (e.g. qemu+tls://node5/system). Unset: "
        "guest_libvirt_uri (right only when the nodes can open it as it is).",
    ),
    cfg.HostAddressOpt(
        "guest_migration_host",
        help="Address this node's QEMU listens on for a guest arriving by live migration "
        "(its memory and its disk's written clusters, over TCP). Unset: host_ip.",
    ),
    cfg.IntOpt(
        "guest_migration_timeout",
        default=600,
        min=1,
        help="Seconds a live migration out of this node may take; then it is aborted and "
        "the guest keeps running here.",
    ),
    cfg.IntOpt(
        "guest_migration_bandwidth",
        default=0,
        min=0,
        help="MiB/s a live migration out of this node may use (memory and disk). 0: no limit.",
    ),
]


# The z/VM Cloud Connector-shaped REST API (virtman.zvm, docs/zvm-api.rst).
zvm_opts = [
    cfg.BoolOpt(
        "zvm_api_enabled",
        default=False,
        help="Serve the guest REST API in the z/VM Cloud Connector's shape (zvmconnector, "
        "Nova's zvm driver) on zvm_api_listen_host:zvm_api_port, beside XML-RPC. Same "
        "auth_strategy, api_token, TLS files, request_timeout and max_request_bytes.",
    ),
    cfg.HostAddressOpt(
        "zvm_api_listen_host",
        default="127.0.0.1",
        help="Address of the z/VM-shaped API (loopback by default; 0.0.0.0 or :: only when "
        "set explicitly).",
    ),
    cfg.PortOpt(
        "zvm_api_port",
        default=8080,
        help="Port of the z/VM-shaped API (8080: zvmconnector's default for REST).",
    ),
    cfg.IntOpt(
        "zvm_api_connections",
        default=16,
        min=1,
        max=1024,
        help="Connections the z/VM-shaped API serves at once (one thread each, each closed "
        "after request_timeout of silence); one more is answered 503 and closed.",
    ),
    cfg.StrOpt(
        "zvm_api_auth",
        default="token",
        choices=["token", "peer-uid"],
        help="How the z/VM-shaped API authenticates callers (unless auth_strategy = noauth). "
        "token: X-Auth-Token (POST /token with X-Admin-Token = api_token, or api_token "
        "itself). peer-uid: also, without a token, a caller on this host whose TCP socket is "
        "owned by one of zvm_api_peer_users (for Nova's zvm driver, which cannot send a "
        "token); needs zvm_api_listen_host on loopback.",
    ),
    cfg.ListOpt(
        "zvm_api_peer_users",
        default=[],
        help="Users (names or uids) whose local processes need no token when zvm_api_auth = "
        "peer-uid, e.g. nova.",
    ),
    cfg.IntOpt(
        "zvm_api_token_ttl",
        default=3600,
        min=60,
        max=86400,
        help="Seconds a token issued by POST /token (X-Admin-Token = api_token) stays valid.",
    ),
    cfg.IntOpt(
        "zvm_image_import_max_gib",
        default=64,
        min=1,
        max=65536,
        help="Largest image (GiB) image_import fetches from an http(s):// URL into the first "
        "of image_dirs; a longer answer is refused and nothing is kept.",
    ),
    cfg.ListOpt(
        "zvm_image_import_url_prefixes",
        default=[],
        help="URL prefixes image_import may fetch http(s):// images from, e.g. "
        "https://images.example.org/glance/ (a URL must be one of them or below one at a / "
        "boundary; redirects are checked too). Empty (the default): URL imports are refused, "
        "file:// imports from image_dirs still work; without this list anyone holding the "
        "API's credential could make the node fetch from any address it reaches.",
    ),
    cfg.StrOpt(
        "zvm_bridge",
        default="virbr0",
        help="Linux bridge that the guests' network interfaces created through the "
        "z/VM-shaped API are attached to (guest_create_network_interface, guest_create_nic: "
        "virtio NICs of the guest's domain); it must exist when a guest with NICs starts.",
    ),
]


# [vcenter]: guests on vSphere through oslo.vmware (virtman/guest/vcenter.py, docs/vcenter.rst)
vcenter_opts = [
    cfg.HostAddressOpt("host", help="vCenter's address. Unset: no vSphere backend."),
    cfg.PortOpt("port", default=443, help="vCenter's port."),
    cfg.StrOpt(
        "scheme",
        default="https",
        choices=["https", "http"],
        help="http is accepted for a loopback host only (the simulator in the tests).",
    ),
    cfg.StrOpt("username", help="vCenter user that creates, powers and destroys the VMs."),
    cfg.StrOpt("password", secret=True, help="That user's password."),
    cfg.StrOpt("ca_file", help="CA bundle that signs vCenter's certificate (https)."),
    cfg.BoolOpt(
        "insecure",
        default=False,
        help="Skip the certificate check (https). Never in production.",
    ),
    cfg.StrOpt(
        "wsdl_location",
        help="URL of the vSphere WSDL. Unset: the one vCenter serves at /sdk/vimService.wsdl, "
        "or with generate_wsdl the one virtman writes.",
    ),
    cfg.BoolOpt(
        "generate_wsdl",
        default=False,
        help="Write a WSDL of the calls virtman makes over oslo.vmware's own schemas, for a "
        "vCenter that serves none (govmomi's simulator).",
    ),
    cfg.StrOpt(
        "datastore",
        help="Datastore for the VMs' configuration files. Unset: the datacenter's first.",
    ),
    cfg.IntOpt("api_retry_count", default=3, min=0, help="Retries of a failed vSphere call."),
    cfg.FloatOpt("task_poll_interval", default=0.2, min=0.01, help="Seconds between task polls."),
    cfg.StrOpt(
        "esx_host",
        choices=["vsphere", "recorded"],
        help="How the ESXi host's side of a guest's disk is done (its software iSCSI adapter "
        "pointed at this node, a rescan, the RDM's ReconfigVM_Task). vsphere: made through "
        "vCenter on the host each VM runs on (HostStorageSystem; tested against a fake only, "
        "docs/vcenter.rst); needs driver = dm (the qemu driver's disks are qcow2). "
        "recorded: written to <state_dir>/vcenter-esx-host.json, not done (govmomi's "
        "simulator can do none of it). Unset: guest_backend = vcenter refuses to start.",
    ),
    cfg.FloatOpt(
        "cpu_allocation_ratio",
        default=4.0,
        min=0.1,
        help="vCPUs reported as capacity per CPU thread of the connected ESXi hosts.",
    ),
]
