#!/usr/bin/env bash
# Set up everything simfs + vzquota needs on a Debian machine, as root:
# system packages (fuse3, libfuse3-dev, pkg-config, a C compiler, attr, acl, groff,
# and e2fsprogs/xfsprogs/btrfs-progs for the tests' loop-image backings),
# a virtual environment in .venv with the project and its test extras, and
# `simfs`/`vzquota` in /usr/local/sbin (so `mount -t fuse.simfs` and fstab find
# simfs). Quick when everything is already there. Prints what it does.
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
for pkg in fuse3 libfuse3-dev pkg-config gcc attr acl groff-base e2fsprogs xfsprogs btrfs-progs; do
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
if ! .venv/bin/python - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, pyfuse3, anyio, uvloop, trio, xattr, pytest, simfs, vzquota
md.version("simfs-vzquota")
PYEOF
then
    echo "setup: installing the project and its test extras into .venv"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c 'import pyfuse3, anyio, uvloop, trio, xattr, pytest, simfs, vzquota'
fi

for tool in simfs vzquota; do
    ln -sfn "$top/.venv/bin/$tool" "/usr/local/sbin/$tool"
done
echo "setup: ready ($(.venv/bin/python --version), pyfuse3 $(.venv/bin/python -c 'import pyfuse3; print(pyfuse3.__version__)'))"
