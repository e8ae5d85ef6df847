#!/usr/bin/env bash
# Build the vCenter simulator (tools/vcsim/main.go over Debian's govmomi sources, offline) and
# cache it as .work/bin/vmt-vcsim; rebuilt only when main.go or the govmomi package changes.
set -euo pipefail
cd "$(dirname "$0")/../.."

# tools/setup.sh installs golang-go and golang-github-vmware-govmomi-dev (its package list)
for p in golang-go golang-github-vmware-govmomi-dev; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
        || { echo "vcsim: package $p is missing: run tools/setup.sh" >&2; exit 1; }
done

out=.work/bin/vmt-vcsim
stamp=$( (cat tools/vcsim/main.go; dpkg-query -W -f '${Version}' golang-go golang-github-vmware-govmomi-dev) \
    | sha256sum | cut -c1-16)
if [ -x "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi
mkdir -p .work/bin .work/gocache
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
mkdir -p "$src/src/vmt-vcsim"
cp tools/vcsim/main.go "$src/src/vmt-vcsim/"
echo "vcsim: building $out (about a minute the first time)"
(cd "$src/src/vmt-vcsim" && GO111MODULE=off GOPATH="$src:/usr/share/gocode" \
    GOCACHE="$OLDPWD/.work/gocache" go build -o "$OLDPWD/$out.tmp" .)
mv "$out.tmp" "$out"
echo "$stamp" > "$out.stamp"
