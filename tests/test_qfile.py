"""The quota file (portable bytes, checksum, atomic replace, lock) and the layering
rule that the core never imports the FUSE stack."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vzquota import errors
from vzquota.model import QuotaObject, QuotaState
from vzquota.qfile import QuotaFile, decode, encode


def sample() -> QuotaState:
    st = QuotaState(qid=7, path="/vz/private/7")
    st.level1.space.usage, st.level1.space.soft, st.level1.space.hard = 4096, 1 << 20, 2 << 20
    st.level1.inodes.usage, st.level1.inodes.soft = 3, 100
    st.level1.space.deadline = 1_700_000_000
    st.grace1.space = 86400
    st.ugid_on, st.ugid_limit = True, 10
    st.users[500] = QuotaObject()
    st.users[500].space.usage = 4096
    st.groups[0] = QuotaObject()
    st.on, st.mounted = True, True
    return st


def test_round_trip_and_canonical_bytes():
    st = sample()
    data = encode(st)
    assert decode(data, "x") == st
    assert encode(decode(data, "x")) == data      # canonical: same state, same bytes
    assert data.startswith(b"vzquota-simfs-quota 1\n")
    assert data.isascii()


@pytest.mark.parametrize("damage", [
    lambda d: d[: len(d) // 2],                     # truncated
    lambda d: d.replace(b'"qid":7', b'"qid":8'),    # edited: checksum mismatch
    lambda d: b"garbage\n",                         # not a quota file
    lambda d: b"",                                  # empty
    lambda d: d.replace(b"quota 1", b"quota 9"),    # future version
    lambda d: bytes([0xff]) + d,                    # not text
])
def test_damaged_file_is_quota_file_error(damage):
    with pytest.raises(errors.VzError) as e:
        decode(damage(encode(sample())), "f")
    assert e.value.code == errors.EC_QUOTAFILE


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    qf = QuotaFile(7, str(tmp_path / "quota.7"))
    qf.save(sample())
    st = sample()
    st.level1.space.usage = 8192
    qf.save(st)
    assert qf.load().level1.space.usage == 8192
    assert sorted(os.listdir(tmp_path)) == ["quota.7"]
    assert oct(os.stat(qf.path).st_mode & 0o777) == "0o600"


def test_wrong_id_and_missing_file(tmp_path):
    qf = QuotaFile(8, str(tmp_path / "quota.8"))
    with pytest.raises(errors.VzError) as e:
        qf.load()
    assert e.value.code == errors.EC_NOQUOTAFILE
    QuotaFile(7, qf.path).save(sample())
    with pytest.raises(errors.VzError) as e:
        qf.load()
    assert e.value.code == errors.EC_QUOTAFILE


def test_lock_excludes_a_second_holder(tmp_path):
    qf = QuotaFile(7, str(tmp_path / "quota.7"))
    with qf.lock():
        with pytest.raises(errors.VzError) as e:
            with qf.lock(wait=0.1):
                pass
        assert e.value.code == errors.EC_LOCKED
    with qf.lock(wait=0):
        pass


# What the pure core must never import: a FUSE binding, an event loop, the adapter.
NOT_IN_THE_CORE = ("pyfuse3", "fusewire", "simfs", "trio", "anyio", "asyncio", "uvloop",
                   "sniffio")


def test_core_never_imports_the_fuse_stack():
    """Every module of vzquota/ (and simfs's pure helpers statfs and lower),
    imported together, brings in no binding, no event loop and no handler."""
    import pkgutil
    import vzquota
    mods = sorted("vzquota." + m.name for m in pkgutil.iter_modules(vzquota.__path__))
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_IN_THE_CORE!r})\n"
            "assert not bad, bad\n"
            "import simfs.statfs, simfs.lower\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pyfuse3', 'fusewire', 'trio', 'anyio', 'asyncio', 'uvloop'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
