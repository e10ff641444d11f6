#!/usr/bin/env bash
# The demo: set everything up (tools/setup.sh, no compiler needed), then give a container root a
# quota and show it working: vzquota init/on, mount with simfs, df inside,
# files passing through both ways, write until "Disk quota exceeded",
# vzquota stat, unmount, vzquota show. Everything lives in a temporary
# directory (quota files and sockets too) and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== Setting up (tools/setup.sh: system packages, the project installed in its own"
echo "   environment; 10-60 s the first time, quick after)"
bash tools/setup.sh 2>&1 | sed 's/^/   /'
# the installed commands, as an admin would run them
PATH=${SIMFS_PREFIX:-/usr/local/lib/simfs-vzquota}/bin:$PATH

demo=$(mktemp -d /tmp/simfs-demo.XXXXXX)
export VZQUOTA_DIR=$demo/vzquota VZQUOTA_RUNDIR=$demo/run
private=$demo/private/101
root=$demo/root/101
mkdir -p "$private/etc" "$root"
echo "demo container" > "$private/etc/hostname"
mounted=""
cleanup() {
    [ -z "$mounted" ] || umount "$root" 2>/dev/null || umount -l "$root" 2>/dev/null || true
    rm -rf "$demo"
}
trap cleanup EXIT

run() { printf '\n$ %s\n' "$*"; "$@"; }

echo "== A container's private area $private, its root $root"
run vzquota init 101 -p "$private" -b 10M -B 12M -i 1000 -I 1200 -e 1d -n 1d
run vzquota on 101
run simfs "$private" "$root" -o dev,suid,quotaid=101
mounted=1

echo; echo "== Inside, df shows the container's own size (the soft limit), not the host's"
run df -h "$root"
run df -i "$root"

echo; echo "== Files pass through both ways"
run cat "$root/etc/hostname"
run sh -c "echo 'written inside' > '$root/etc/motd'"
run cat "$private/etc/motd"

echo; echo "== Write until the quota says no (hard limit 12 MiB; nobody, root included, is exempt)"
printf '\n$ dd if=/dev/zero of=%s bs=1M count=100\n' "$root/fill"
dd if=/dev/zero of="$root/fill" bs=1M count=100 2>&1 | sed 's/^/  /' || true
run ls -ls "$root/fill"
run df -h "$root"

echo; echo "== The live figures (over the soft limit: '*' and the grace time left)"
run vzquota stat 101

echo; echo "== Unmount: the usage is saved in the quota file"
run umount "$root"
mounted=""
run vzquota show 101
echo; echo "Demo finished; $demo removed."
