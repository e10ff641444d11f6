"""tools/fstests (the outside suites through a quota mount): its usage errors
exit 2 before anything is mounted, and its reading of prove's summary finds
the failed tests (ranges and lists, a non-zero exit status) that it compares
with the backing's own failures; SIGTERM ends a run with nothing left behind
(a real mount, a stand-in suite).  The suites themselves are not the
project's and are run by hand (README, "The outside suites")."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import assert_run_left_nothing

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fstests"


def load():
    os.environ["FSTESTS_REEXEC"] = "1"
    loader = importlib.machinery.SourceFileLoader("fstests_tool", str(TOOL))
    spec = importlib.util.spec_from_loader("fstests_tool", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


SUMMARY = """\
/x/tests/chown/00.t .......... ok
Test Summary Report
-------------------
/x/tests/chown/00.t          (Wstat: 0 Tests: 1280 Failed: 0)
  TODO passed:   1054, 1058
/x/tests/symlink/03.t        (Wstat: 0 Tests: 6 Failed: 2)
  Failed tests:  1-2
/x/tests/open/07.t           (Wstat: 256 (exited 1) Tests: 25 Failed: 3)
  Failed tests:  4, 9, 11
  Non-zero exit status: 1
Files=238, Tests=8798, 244 wallclock secs ( 2.42 usr  0.53 sys + 45.09 cusr = 61.34 CPU)
Result: FAIL
"""


def test_prove_failures():
    failed, totals = load().prove_failures(SUMMARY)
    assert failed == {"symlink/03.t#1", "symlink/03.t#2", "open/07.t#4", "open/07.t#9",
                      "open/07.t#11", "open/07.t#status"}
    assert totals == "8798 tests in 238 files, Result: FAIL"


VERBOSE = """\
/x/tests/rename/24.t ........... 
1..13
ok 1
ok 2
ok 3
not ok 4 # TODO Btrfs uses CoW; link count semantics differ from POSIX.
not ok 5 # TODO Btrfs uses CoW; link count semantics differ from POSIX.
ok 6
ok
/x/tests/rmdir/00.t ............ 
1..2
ok 1
ok 2
ok
Files=2, Tests=15,  1 wallclock secs
Result: PASS
"""


def test_prove_todo_failures_are_the_backings_own():
    failed, totals = load().prove_failures(VERBOSE)
    assert failed == {"rename/24.t#4", "rename/24.t#5"}
    assert totals == "15 tests in 2 files, Result: PASS"


def test_usage_errors_exit_2(tmp_path):
    env = dict(os.environ, FSTESTS_REEXEC="1")
    for args, says in ((["--fs", "ext4"], "name at least one suite"),
                       (["--fs", "zfs", "--fsx", "/bin/true"], "unknown backing 'zfs'"),
                       (["--pjdfstest", str(tmp_path)], "no built pjdfstest"),
                       (["--fsx", str(tmp_path / "none")], "not an executable")):
        r = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 2, (args, r)
        assert says in r.stderr, (args, r.stderr)
        assert "fstests: --fs" not in r.stdout       # nothing was started


def test_sigterm_stops_the_suite_and_cleans_up(fuse, tmp_path):
    """SIGTERM during a suite ends the run at once and leaves nothing behind:
    exit 143, the suite it interrupted has no row, its test scripts (prove's
    children, which sit in the mount) are killed, the simfs mount, its daemon,
    the backing and the temp dir are gone.  It used to die where it stood,
    leaving the daemon, the mounts, the quota and prove's scripts running.  The
    "pjdfstest" here is a stand-in whose one test script sleeps in the mount."""
    import select
    import signal
    import time
    fake = tmp_path / "pjd"
    (fake / "tests" / "slow").mkdir(parents=True)
    (fake / "pjdfstest").write_text("#!/bin/sh\n")
    (fake / "pjdfstest").chmod(0o755)
    started = tmp_path / "started"
    script = fake / "tests" / "slow" / "00.t"
    script.write_text(f"#!/bin/sh\necho 1..1\necho $$ > {started}.tmp\n"
                      f"pwd >> {started}.tmp\nmv {started}.tmp {started}\n"
                      "sleep 300\necho ok 1\n")
    script.chmod(0o755)
    env = dict(os.environ, FSTESTS_REEXEC="1")
    p = subprocess.Popen([sys.executable, str(TOOL), "--fs", "tmpfs", "--pjdfstest",
                          str(fake)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    out = ""
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert time.monotonic() < deadline, out
            assert p.poll() is None, out + p.stdout.read() + p.stderr.read()
            if select.select([p.stdout], [], [], 0.2)[0]:
                out += p.stdout.readline()
        pid, cwd = started.read_text().split()
        tmp = re.search(r"\(temp dir (\S+)\)", out).group(1)
        assert cwd.startswith(tmp), (cwd, tmp)
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    out += rest
    assert p.returncode == 143, out + err
    assert "stopped by SIGTERM" in err, err
    assert "tmpfs    pjdfstest" not in out, out          # no row for the interrupted suite
    for _ in range(50):                                  # the script (and its sleep) died
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the suite's script {pid} still runs")
    assert_run_left_nothing(tmp)
