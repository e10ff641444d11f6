#!/usr/bin/env bash
# Set up simfs + vzquota on a Debian machine, as root.  Prints what it does.
#
#   bash tools/setup.sh          what the demo and a host need:
#     - system packages: fuse3 (fusermount3, and its mount helper for a mount
#       without /sbin/mount.fuse.simfs), attr and acl (getfattr/setfacl), groff-base and man-db
#       (man pages), logrotate (rotates /var/log/simfs.log); python3 and
#       python3-venv when no Python >= 3.11 with venv is there;
#     - the project installed like software (`pip install .`, dependencies from
#       binary wheels only: nothing is compiled) in its own virtual environment
#       /usr/local/lib/simfs-vzquota, with simfs, vzquota, simfs-service,
#       mount.fuse.simfs, vzquota-metrics, vzdqcheck, vzdqdump and vzdqload
#       linked into /usr/local/sbin, mount.fuse.simfs also into /sbin (mount(8)
#       looks for /sbin/mount.fuse.simfs first; without it, it runs fuse3's
#       /sbin/mount.fuse, which adds dev,suid unless nodev,nosuid are given and
#       runs `simfs` from a standard PATH), the man pages into
#       /usr/local/share/man/man8, copies of the units into
#       /usr/local/lib/systemd/system and of simfs-generator into
#       /usr/local/lib/systemd/system-generators, and a copy of the logrotate
#       file into /etc/logrotate.d/simfs.
#       Nothing there points into the checkout.  SIMFS_PREFIX=DIR installs the
#       environment elsewhere, SIMFS_DESTDIR=DIR puts those links and copies
#       under DIR (DIR/usr/local/sbin, DIR/sbin, DIR/etc/logrotate.d...).
#   bash tools/setup.sh --test   also what the tests need:
#     - e2fsprogs, xfsprogs, btrfs-progs (loop-image backings), busybox and wrk
#       (tools/webbench), dbench (tools/bench.py's dbench row), linux-perf
#       (bench.py --perf), and libfuse3-dev,
#       pkg-config, gcc (the pyfuse3 fallback
#       binding is built from source for the tests that run on it);
#     - systemd-container (systemd-nspawn) and debootstrap, without their
#       recommended packages (tools/nspawn-boot boots a Debian root on simfs);
#     - .venv in the checkout: the project (editable) with its test and pyfuse3
#       extras (the pyfuse3 wheel is built once per Python ABI and kept in
#       /var/cache/simfs-vzquota).
#   bash tools/setup.sh --packages   prints every system package it may install
#     (one a line; the README lists them all) and does nothing else.
# Quick when everything is already there (the system install is redone only when
# the checkout's sources differ from what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."

base_pkgs=(fuse3 attr acl groff-base man-db logrotate)
test_pkgs=(e2fsprogs xfsprogs btrfs-progs wrk dbench linux-perf libfuse3-dev pkg-config gcc)
nspawn_pkgs=(systemd-container debootstrap)     # installed without recommends
python_pkgs=(python3 python3-venv)              # only when no Python >= 3.11 with venv

test_env=""
case "${1:-}" in
    --test) test_env=1 ;;
    --packages)
        printf '%s\n' "${base_pkgs[@]}" "${python_pkgs[@]}" "${test_pkgs[@]}" busybox \
            "${nspawn_pkgs[@]}"
        exit 0 ;;
    "") ;;
    *) echo "usage: tools/setup.sh [--test|--packages]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "setup: run me as root (apt-get, mounting and quotas need it)" >&2
    exit 1
fi

apt_install() {
    if [ -z "${apt_updated:-}" ]; then
        echo "setup: apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    echo "setup: apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pkgs=("${base_pkgs[@]}")
[ -z "$test_env" ] || pkgs+=("${test_pkgs[@]}")
need=()
for pkg in "${pkgs[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# tools/webbench needs a busybox with httpd: either package will do
if [ -n "$test_env" ] && ! dpkg -s busybox >/dev/null 2>&1 && ! dpkg -s busybox-static >/dev/null 2>&1; then
    need+=(busybox)
fi
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
# tools/nspawn-boot: without recommends (systemd-container's would add
# libnss-mymachines to the host's nsswitch.conf)
if [ -n "$test_env" ]; then
    need=()
    for pkg in "${nspawn_pkgs[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
    [ ${#need[@]} -eq 0 ] || apt_install --no-install-recommends "${need[@]}"
fi

# A Python >= 3.11 with venv support.
PY=""
for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 &&
       "$cand" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PY=$(command -v "$cand")
        break
    fi
done
if [ -z "$PY" ]; then
    apt_install "${python_pkgs[@]}"
    PY=$(command -v python3)
fi

[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

quiet_pip() { grep -v '^WARNING: Location' || true; }

# The system install.  Several checkouts may run this at once: one at a time.
SYS=${SIMFS_PREFIX:-/usr/local/lib/simfs-vzquota}
stamp=$(cat pyproject.toml README.md $(find fusewire simfs vzquota man systemd logrotate -type f \
        \( -name '*.py' -o -name '*.8' -o -name '*.service' -o -name '*.timer' \
        -o -name '*.target' -o -name '*.conf' -o -name '*-generator' \
        -o -path 'logrotate/*' \) | sort) \
        | sha256sum | cut -d' ' -f1)
exec 9>"$SYS.lock"
flock 9
if [ "$(cat "$SYS/.installed-from" 2>/dev/null)" != "$stamp" ]; then
    if [ ! -x "$SYS/bin/python" ]; then
        echo "setup: creating $SYS with $PY"
        "$PY" -m venv "$SYS"
    fi
    echo "setup: installing the project into $SYS (pip install ., binary wheels only)"
    build=$(mktemp -d)
    # Build from a copy, so that the checkout gets no build/ directory.
    tar -cf - pyproject.toml README.md fusewire simfs vzquota man systemd logrotate \
        | tar -xf - -C "$build"
    "$SYS/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet_pip
    # An older install may hold pyfuse3 (the binding before fusewire): not needed.
    "$SYS/bin/python" -m pip uninstall -q -y pyfuse3 >/dev/null 2>&1 || true
    "$SYS/bin/python" -m pip install -q --only-binary :all: --force-reinstall "$build" 2>&1 | quiet_pip
    rm -rf "$build"
    "$SYS/bin/python" -c 'import fusewire, simfs.mount, vzquota'
    echo "$stamp" > "$SYS/.installed-from"
fi
DEST=${SIMFS_DESTDIR:-}
mkdir -p "$DEST/usr/local/sbin" "$DEST/usr/local/share/man/man8" \
    "$DEST/usr/local/lib/systemd/system" "$DEST/etc/logrotate.d"
for tool in simfs vzquota simfs-service mount.fuse.simfs vzquota-metrics vzdqcheck vzdqdump vzdqload; do
    ln -sfn "$SYS/bin/$tool" "$DEST/usr/local/sbin/$tool"
done
# mount(8) (libmount) runs /sbin/mount.TYPE and only that directory: without our
# helper there it falls back to fuse3's /sbin/mount.fuse, which adds dev,suid
# to the options unless nodev/nosuid are given (simfs's own default is
# nodev,nosuid).  On a merged-/usr Debian /sbin is a link to usr/sbin.
mkdir -p "$DEST/sbin"
ln -sfn "$SYS/bin/mount.fuse.simfs" "$DEST/sbin/mount.fuse.simfs"
# every page: simfs, vzquota, vzquota-metrics, vzdqcheck, vzdqdump and vzdqload
# (vzdqload.8 is `.so man8/vzdqdump.8`, found next to it)
for page in "$SYS"/share/man/man8/*.8; do
    ln -sfn "$page" "$DEST/usr/local/share/man/man8/$(basename "$page")"
done
# Copies, not links into the environment: systemctl takes a unit file that is a
# symlink for a "linked" unit (enable/disable then act on the link), and a unit
# must not change or vanish with the environment.
mkdir -p "$DEST/usr/local/lib/systemd/system-generators"
for unit in "$SYS"/lib/systemd/system/*; do
    dest="$DEST/usr/local/lib/systemd/system/$(basename "$unit")"
    rm -f "$dest"
    cp "$unit" "$dest"
done
for gen in "$SYS"/lib/systemd/system-generators/*; do
    dest="$DEST/usr/local/lib/systemd/system-generators/$(basename "$gen")"
    rm -f "$dest"
    install -m 0755 "$gen" "$dest"
done
# logrotate reads only /etc/logrotate.d and wants its files root's and not
# writable by others: a copy, not a link into the environment
if ! cmp -s "$SYS/share/simfs-vzquota/logrotate/simfs" "$DEST/etc/logrotate.d/simfs"; then
    echo "setup: installing $DEST/etc/logrotate.d/simfs (rotates /var/log/simfs.log)"
    install -m 0644 "$SYS/share/simfs-vzquota/logrotate/simfs" "$DEST/etc/logrotate.d/simfs"
fi
if [ -z "$DEST" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || true
fi
exec 9>&-

if [ -z "$test_env" ]; then
    echo "setup: ready (simfs $("$SYS/bin/simfs" --version | cut -d' ' -f2), $("$SYS/bin/python" --version); installed in $SYS)"
    exit 0
fi

# The test environment: .venv in the checkout, with pyfuse3 for the fallback.
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi
PYFUSE3=3.5.0
exec 8>/var/cache/simfs-vzquota.lock
flock 8
WHEELS=/var/cache/simfs-vzquota/pyfuse3-$PYFUSE3-$(.venv/bin/python -c 'import sys; print(sys.implementation.cache_tag)')
if ! ls "$WHEELS"/pyfuse3-*.whl >/dev/null 2>&1; then
    echo "setup: building pyfuse3 $PYFUSE3 (the fallback binding) against libfuse3-dev"
    mkdir -p "$WHEELS.tmp"
    .venv/bin/python -m pip wheel -q --no-deps "pyfuse3==$PYFUSE3" -w "$WHEELS.tmp" 2>&1 | quiet_pip
    ls "$WHEELS.tmp"/pyfuse3-*.whl >/dev/null
    rm -rf "$WHEELS"
    mv "$WHEELS.tmp" "$WHEELS"
fi
exec 8>&-
# (re)install when something is missing, including a console script added since,
# or when .venv still holds the patched pyfuse3 of before
# (checked from /, so that the checkout's own directory does not hide a package
# the editable install does not map yet)
if ! (cd / && "$OLDPWD/.venv/bin/python" - <<'PYEOF') 2>/dev/null
import importlib.metadata as md, os, sys, pyfuse3, pyfuse3.asyncio, anyio, uvloop, trio, xattr
import pytest, fusewire, simfs, vzquota, prometheus_client, tqdm, setproctitle
md.version("simfs-vzquota")
assert not hasattr(pyfuse3.asyncio, "callback_loop")
bindir = os.path.dirname(sys.executable)
for tool in ("simfs", "vzquota", "simfs-service", "mount.fuse.simfs", "vzquota-metrics",
             "vzdqcheck", "vzdqdump", "vzdqload"):
    assert os.path.exists(os.path.join(bindir, tool)), tool
PYEOF
then
    echo "setup: installing the project with its test and pyfuse3 extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet_pip
    .venv/bin/python -m pip install -q --force-reinstall --no-deps "$WHEELS"/pyfuse3-*.whl 2>&1 | quiet_pip
    .venv/bin/python -m pip install -q --find-links "$WHEELS" -e ".[test,pyfuse3]" 2>&1 | quiet_pip
    .venv/bin/python -c 'import pyfuse3, anyio, uvloop, trio, xattr, pytest, fusewire, simfs, vzquota'
fi
echo "setup: ready ($(.venv/bin/python --version), fusewire, pyfuse3 $(.venv/bin/python -c 'import pyfuse3; print(pyfuse3.__version__)') as the fallback; installed in $SYS)"
