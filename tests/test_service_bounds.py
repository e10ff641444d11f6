"""The mount service reads and checks a request before it forks (issue 21
item 5): idle connections cost no process (at most MAX_PENDING are read at
once, the rest wait unaccepted, an idle one is dropped after REQUEST_TIMEOUT),
and a request that does not match the schema (an environment sent as a list,
...) is refused and mounts nothing."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from backing import wait_usage_matches
from conftest import is_mountpoint
from simfs import forkserver
from test_service import Service, init_on, simfs


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


@pytest.fixture
def service(fuse, tmp_path):
    s = Service(tmp_path / "service.log")
    yield s
    s.stop()
    text = s.log.read_text(errors="replace")
    assert "Traceback" not in text, text


def test_idle_connections_fork_nothing_and_time_out(service, world_tmp):
    path = forkserver.socket_path()
    idle = []
    for _ in range(100):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:      # the backlog is full: not accepted yet
            pass
        idle.append(c)
    time.sleep(1.0)
    assert children(service.proc.pid) == []    # was one child per connection
    for c in idle[10:]:
        c.close()
    del idle[10:]
    # a real mount still goes through while 10 connections stay idle
    private, root = world_tmp / "private", world_tmp / "root"
    private.mkdir()
    root.mkdir()
    init_on(101, private)
    t0 = time.monotonic()
    r = simfs(str(private), str(root), "-o", "quotaid=101")
    try:
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 5
        assert len(children(service.proc.pid)) == 1
        (root / "f").write_bytes(b"x" * 40960)
        assert wait_usage_matches(private, 101) == []
        # the idle ones are dropped after REQUEST_TIMEOUT, with a message
        deadline = time.monotonic() + forkserver.REQUEST_TIMEOUT + 10
        c = idle[0]
        c.setblocking(True)
        c.settimeout(max(1.0, deadline - time.monotonic()))
        got = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
        assert b"timed out waiting for the request" in got, got
    finally:
        for c in idle:
            c.close()
        os.system(f"umount {root}")
    assert not is_mountpoint(str(root))


def send(req, nfds: int = 3) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(forkserver.socket_path())
    data = json.dumps(req).encode()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        socket.send_fds(s, [data[:1]], [null] * nfds)
        s.sendall(data[1:])
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return got.decode()
            got += chunk
    finally:
        os.close(null)
        s.close()


@pytest.mark.parametrize("bad, why", [
    ({"env": [["PATH", "/usr/bin:/bin"]]}, "env must be an object"),
    ({"env": {"PATH": 5}}, "env must be an object"),
    ({"argv": "private root"}, "argv must be a list"),
    ({"argv": ["p", 7]}, "argv must be a list"),
    ({"cwd": "relative"}, "cwd must be an absolute path"),
    ({"extra": 1}, "an object with argv, cwd and env"),
    ({"nfds": 1}, "standard input, output and error"),
])
def test_a_request_off_the_schema_is_refused(service, world_tmp, bad, why):
    private, root = world_tmp / "private", world_tmp / "root"
    private.mkdir()
    root.mkdir()
    req = {"argv": [str(private), str(root)], "cwd": "/", "env": {"PATH": "/usr/bin:/bin"}}
    nfds = bad.pop("nfds", 3)
    req.update(bad)
    try:
        got = send(req, nfds)
        assert got.startswith("the mount service refused the request: ") and why in got, got
        assert not is_mountpoint(str(root))
        assert children(service.proc.pid) == []
    finally:
        if is_mountpoint(str(root)):
            os.system(f"umount {root}")
