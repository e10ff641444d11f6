#!/usr/bin/env bash
# Set up everything simfs + vzquota needs on a Debian machine, as root:
# - system packages (fuse3, libfuse3-dev, pkg-config, a C compiler, attr, acl,
#   groff, e2fsprogs/xfsprogs/btrfs-progs for the tests' loop-image backings, and
#   busybox and wrk for tools/webbench's HTTP servers and load);
# - .venv in the checkout: the project (editable) and its test extras, for the
#   tests and development;
# - the project installed like software (`pip install .`, not editable) in its
#   own virtual environment /usr/local/lib/simfs-vzquota, with simfs, vzquota,
#   vzquota-metrics,
#   simfs-service and mount.fuse.simfs linked into /usr/local/sbin (mount(8)
#   runs fuse3's helper with a standard PATH, which then runs `simfs`), the man
#   pages into /usr/local/share/man/man8 and simfs@.service into
#   /usr/local/lib/systemd/system.  Nothing there points into the checkout, so
#   moving or deleting the checkout leaves fstab mounts and units working.
# - pyfuse3 built from its sdist with the project's patch (patches/README.md:
#   a cheaper request loop under asyncio), into both environments; the wheel is
#   built once per patch and kept in /var/cache/simfs-vzquota.
# Quick when everything is already there (the system install is redone only
# when the checkout's sources differ from what is installed). Prints what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

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

need=()
for pkg in fuse3 libfuse3-dev pkg-config gcc patch attr acl groff-base e2fsprogs xfsprogs btrfs-progs busybox wrk; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"

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
    apt_install python3 python3-venv python3-dev
    PY=$(command -v python3)
fi

[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi

# pyfuse3 with patches/pyfuse3-*.patch applied (see patches/README.md).
PYFUSE3=3.5.0
PATCHES=$(ls patches/pyfuse3-$PYFUSE3-*.patch)
PATCHSUM=$(cat $PATCHES | sha256sum | cut -c1-16)
patched_pyfuse3() {     # $1: the python of a virtual environment
    local WHEELS
    WHEELS=/var/cache/simfs-vzquota/pyfuse3-$PYFUSE3-$PATCHSUM-$("$1" -c 'import sys; print(sys.implementation.cache_tag)')
    if "$1" -c "import sys, pyfuse3, pyfuse3.asyncio as a
sys.exit(pyfuse3.__version__ != '$PYFUSE3' or not hasattr(a, 'callback_loop'))" 2>/dev/null; then
        return
    fi
    if ! ls "$WHEELS"/pyfuse3-*.whl >/dev/null 2>&1; then
        echo "setup: building pyfuse3 $PYFUSE3 with $PATCHES"
        local tmp
        tmp=$(mktemp -d)
        "$1" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3" -d "$tmp" 2>&1 \
            | grep -v '^WARNING: Location' || true
        tar -xzf "$tmp/pyfuse3-$PYFUSE3.tar.gz" -C "$tmp"
        for p in $PATCHES; do
            patch -s -p1 -d "$tmp/pyfuse3-$PYFUSE3" < "$p"
        done
        mkdir -p "$WHEELS.tmp"
        "$1" -m pip wheel -q --no-deps "$tmp/pyfuse3-$PYFUSE3" -w "$WHEELS.tmp" 2>&1 \
            | grep -v '^WARNING: Location' || true
        rm -rf "$tmp"
        ls "$WHEELS.tmp"/pyfuse3-*.whl >/dev/null
        rm -rf "$WHEELS"
        mv "$WHEELS.tmp" "$WHEELS"
    fi
    echo "setup: installing the patched pyfuse3 into $(dirname "$(dirname "$1")")"
    "$1" -m pip install -q --force-reinstall --no-deps "$WHEELS"/pyfuse3-*.whl 2>&1 \
        | grep -v '^WARNING: Location' || true
    "$1" -m pip install -q "$WHEELS"/pyfuse3-*.whl 2>&1 | grep -v '^WARNING: Location' || true
    "$1" -c 'import pyfuse3.asyncio as a; a.callback_loop'
}
exec 8>/var/cache/simfs-vzquota.lock
flock 8
mkdir -p /var/cache/simfs-vzquota
patched_pyfuse3 .venv/bin/python
# (re)install when something is missing, including a console script added since
if ! .venv/bin/python - <<'PYEOF' 2>/dev/null || [ ! -x .venv/bin/vzdqload ]
import importlib.metadata as md, os, sys, pyfuse3, anyio, uvloop, trio, xattr, pytest, simfs, vzquota
import prometheus_client, tqdm
md.version("simfs-vzquota")
bindir = os.path.dirname(sys.executable)
# entry points added later need a reinstall of an older .venv
for tool in ("simfs", "vzquota", "simfs-service", "mount.fuse.simfs", "vzquota-metrics"):
    assert os.path.exists(os.path.join(bindir, tool)), tool
PYEOF
then
    echo "setup: installing the project and its test extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import pyfuse3, anyio, uvloop, trio, xattr, pytest, simfs, vzquota'
    patched_pyfuse3 .venv/bin/python
fi

# The system install.  Several checkouts may run this at once: one at a time.
SYS=${SIMFS_PREFIX:-/usr/local/lib/simfs-vzquota}
stamp=$(cat pyproject.toml README.md patches/* $(find simfs vzquota man systemd -type f \
        \( -name '*.py' -o -name '*.8' -o -name '*.service' \) | sort) | sha256sum | cut -d' ' -f1)
exec 9>"$SYS.lock"
flock 9
if [ "$(cat "$SYS/.installed-from" 2>/dev/null)" != "$stamp" ]; then
    if [ ! -x "$SYS/bin/python" ]; then
        echo "setup: creating $SYS with $PY"
        "$PY" -m venv "$SYS"
    fi
    echo "setup: installing the project into $SYS (pip install .)"
    build=$(mktemp -d)
    # Build from a copy, so that the checkout gets no build/ directory.
    tar -cf - pyproject.toml README.md simfs vzquota man systemd | tar -xf - -C "$build"
    "$SYS/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    "$SYS/bin/python" -m pip install -q --force-reinstall --no-deps "$build" 2>&1 | grep -v '^WARNING: Location' || true
    patched_pyfuse3 "$SYS/bin/python"
    "$SYS/bin/python" -m pip install -q "$build" 2>&1 | grep -v '^WARNING: Location' || true
    rm -rf "$build"
    "$SYS/bin/python" -c 'import pyfuse3, trio, simfs, vzquota'
    echo "$stamp" > "$SYS/.installed-from"
fi
patched_pyfuse3 "$SYS/bin/python"
exec 8>&-
for tool in simfs vzquota simfs-service mount.fuse.simfs vzquota-metrics vzdqcheck vzdqdump vzdqload; do
    ln -sfn "$SYS/bin/$tool" "/usr/local/sbin/$tool"
done
mkdir -p /usr/local/share/man/man8 /usr/local/lib/systemd/system
for page in "$SYS"/share/man/man8/*.8; do
    ln -sfn "$page" "/usr/local/share/man/man8/$(basename "$page")"
done
ln -sfn "$SYS/lib/systemd/system/simfs@.service" /usr/local/lib/systemd/system/simfs@.service
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || true
fi
exec 9>&-
echo "setup: ready ($(.venv/bin/python --version), pyfuse3 $(.venv/bin/python -c 'import pyfuse3; print(pyfuse3.__version__)'); installed in $SYS)"
