"""The one configuration object of a mount (``simfs.config.Config``, issue 20
item 3): built from the mount options, it reaches the operations, the inode
table, the ledger and the pruner, and no simfs module keeps a tunable of its
own.  (simfs(8) RESOURCES lists it field for field: tests/test_docs.py.)"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import simfs
from simfs.config import DEFAULT, Config
from simfs.ops import SimOperations


class Ctx:
    uid = gid = 0
    umask = 0o022
    pid = os.getpid()


def test_the_mount_options_set_their_fields_and_nothing_else():
    c = Config.from_options({"maxopen": 256, "maxinodes": 1000, "checkpoint": 5.0,
                             "recounthold": 0.5, "quotaid": 101, "hook": None})
    assert (c.max_open, c.max_inodes, c.checkpoint, c.recount_hold) == (256, 1000, 5.0, 0.5)
    assert type(c.max_open) is int and type(c.checkpoint) is float
    assert c.replace(max_open=65536, max_inodes=200_000, checkpoint=30.0,
                     recount_hold=DEFAULT.recount_hold) == DEFAULT
    for f in Config.fields():
        assert f.metadata["doc"], f.name


def test_the_config_reaches_the_table_the_shares_the_ledger_and_the_pruner(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    cfg = Config(max_open=256, max_inodes=100, prune_slack=4, root_reserve=8, user_share=2,
                 write_slack=0, entry_timeout=5.0, gaps_held=3, prune_gap=0.25,
                 cached_fds=20, read_nowait=1 << 20)
    ops = SimOperations(fd, cfg)
    try:
        assert ops.table.budget.files == 256 and ops.table.budget.cached == 20
        assert ops.shares.reserve == 32 and ops.shares.share == 112
        assert ops.table.max_inodes == 100 and ops.table.prune_slack == 4
        assert ops.ledger.config is cfg and ops.ledger.slack == 0
        assert ops.pruner.config is cfg and ops.pruner._gap == 0.25
        assert ops.read_nowait == 1 << 20
        e = ops.lookup(1, b"f", Ctx())
        assert e.entry_timeout == e.attr_timeout == 5.0
    finally:
        ops.table.close_all()
        os.close(fd)


# Module constants of simfs that are facts, not tunables: protocol and kernel
# numbers, names, and the bounds the command line checks options against.
FACTS = {"ROOT", "EXTENTS_IN_INODE", "EXTENT_MAX", "MAX_QUOTAID", "MAX_UGID",
         "MAX_CHECKPOINT", "MAX_RECOUNTHOLD", "MAX_RECOUNTWAIT",
         "MAX_MAX_READ", "MAX_NAME"}     # the kernel's u32 max_read; a name in mountinfo


def _number(e) -> bool:
    """A number written out (1.0, 64 << 20, 2**32 - 1)."""
    if isinstance(e, ast.Constant):
        return isinstance(e.value, (int, float)) and not isinstance(e.value, bool)
    if isinstance(e, ast.BinOp):
        return _number(e.left) and _number(e.right)
    return isinstance(e, ast.UnaryOp) and _number(e.operand)


def test_no_simfs_module_keeps_a_tunable_of_its_own():
    """Every numeric module constant of the mount's modules is a fact (the
    mount service, simfs/forkserver.py, and the FUSE layer are not a mount's)."""
    found = []
    for path in sorted(Path(simfs.__file__).parent.glob("*.py")):
        if path.name in ("lower.py", "forkserver.py", "config.py"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and _number(node.value):
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id.isupper() and t.id not in FACTS:
                        found.append(f"{path.name}: {t.id}")
    assert found == []
