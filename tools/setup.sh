#!/usr/bin/env bash
# Prepare this machine for VMThunder: system packages and the pinned Python environment
# (.venv). Idempotent; re-running it after a pull installs only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (installs packages; the tests start databases and namespaces)" >&2
    exit 1
fi

# The userspace block stack, its relays and VMs (env: shared/reference/env-userspace-stack.md).
SYSTEM_PACKAGES=(
    qemu-system-x86 qemu-utils qemu-block-extra fuse3 tgt libiscsi-bin libnbd-bin
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
    busybox-static cpio e2fsprogs iproute2 postgresql util-linux python3-venv debootstrap
    systemd rabbitmq-server
    chromium  # the status page's browser test (tests/functional/test_status_page.py)
    golang-go golang-github-vmware-govmomi-dev  # the vCenter simulator (tools/vcsim)
)
packages=()
for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || packages+=("$p")
done
if [ "${#packages[@]}" -gt 0 ]; then
    echo "setup: installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -o DPkg::Lock::Timeout=900 -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

# Without udev, /dev/kvm stays root:root 0600 and libvirt re-probes QEMU on every call
# (a domain start took ~50 s instead of 0.4 s); Debian's udev rule makes it root:kvm 0660.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: Python >= 3.11 needed, found {sys.version.split()[0]}")
PY

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=$(cat requirements.txt test-requirements.txt setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.vmt-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "setup: installing Python dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check \
        -r requirements.txt -r test-requirements.txt
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
    echo "$stamp" > .venv/.vmt-stamp
fi
# The vCenter simulator the vSphere backend's tests run against (docs/vcenter.rst).
tools/vcsim/build.sh
echo "setup: ready ($(.venv/bin/python --version))"
