#!/usr/bin/env bash
# Set everything up (tools/setup.sh --test) and run the whole test suite on the
# default binding (fusewire), then the quota, passthrough and attack tests and
# the set-id cases again on the pyfuse3 fallback (-o fuse=pyfuse3), then tools/nspawn-boot (a Debian
# root on simfs booted by systemd-nspawn, apt-get stopped at the quota) and
# tools/nspawn-units (the systemd units run by a systemd booted in nspawn).
# Extra arguments go to pytest and run that selection only, on the default
# binding (e.g. `bash tools/test.sh -k quota -x`); SIMFS_TEST_FUSE=pyfuse3 runs
# a selection on the fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --test
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -ra "$@"
fi
echo "test: the whole suite on the default binding (fusewire)"
.venv/bin/python -m pytest -ra
echo "test: the quota, passthrough, attack and set-id tests on the pyfuse3 fallback"
SIMFS_TEST_FUSE=pyfuse3 .venv/bin/python -m pytest -ra \
    tests/test_quota_mount.py tests/test_passthrough.py tests/test_attacks.py \
    tests/test_privs_acl.py::test_every_kill_case_as_on_a_local_filesystem
echo "test: tools/nspawn-boot (systemd-nspawn boots a Debian root served by simfs)"
rc=0
tools/nspawn-boot || rc=1
echo "test: tools/nspawn-units (the simfs units under a real systemd in systemd-nspawn)"
tools/nspawn-units || rc=1
exit $rc
