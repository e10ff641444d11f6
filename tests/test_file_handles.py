"""Issue 18 item 12: where simfs cannot keep inodes by file handle, the log
line names the call that failed and its errno, so that systemd-nspawn's
seccomp filter refusing ``open_by_handle_at`` (EPERM, on a filesystem that has
file handles) is not reported as "the filesystem has no file handles".
(tools/nspawn-boot shows it for real: simfs run inside systemd-nspawn.)"""

from __future__ import annotations

import errno
import logging
import os

from simfs import inodes, lower


def refuse(call: str, err: int):
    def fail(*a, **k):
        raise OSError(err, f"{call}: {os.strerror(err)}")
    return fail


def test_open_by_handle_at_refused_names_the_call(monkeypatch, caplog, tmp_path):
    """open_by_handle_at failing with EPERM (as under systemd-nspawn's seccomp
    filter) is named, with its errno, as a refusal, not the filesystem's lack."""
    monkeypatch.setattr(lower, "open_handle", refuse("open_by_handle_at", errno.EPERM))
    fd = os.open(tmp_path, os.O_PATH)
    with caplog.at_level(logging.INFO, logger=inodes.log.name):
        table = inodes.InodeTable(fd)
    assert not table.file_handles
    assert table.handles_error == ("open_by_handle_at", errno.EPERM)
    [rec] = [r for r in caplog.records if "file handles" in r.getMessage()]
    msg = rec.getMessage()
    assert rec.levelno == logging.WARNING, msg
    assert "open_by_handle_at failed with EPERM (Operation not permitted)" in msg, msg
    assert "seccomp" in msg and "not the filesystem" in msg, msg
    assert "has no file handles" not in msg, msg
    assert f"at most {table.budget.pinned} inodes" in msg, msg


def test_no_file_handles_names_name_to_handle_at(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(lower, "handle_of", refuse("name_to_handle_at", errno.EOPNOTSUPP))
    fd = os.open(tmp_path, os.O_PATH)
    with caplog.at_level(logging.INFO, logger=inodes.log.name):
        table = inodes.InodeTable(fd)
    assert table.handles_error == ("name_to_handle_at", errno.EOPNOTSUPP)
    [msg] = [r.getMessage() for r in caplog.records if "file handles" in r.getMessage()]
    assert "has no file handles (name_to_handle_at failed with EOPNOTSUPP" in msg, msg


def test_file_handles_work_here(caplog, tmp_path):
    fd = os.open(tmp_path, os.O_PATH)
    with caplog.at_level(logging.DEBUG, logger=inodes.log.name):
        table = inodes.InodeTable(fd)
    assert table.file_handles and table.handles_error is None
    assert not [r for r in caplog.records if "file handles" in r.getMessage()]
