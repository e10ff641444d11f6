"""The manual pages and the usage text agree with the code.

- vzquota(8) EXIT STATUS lists exactly the codes of ``vzquota.errors.EXIT_CODES``;
- vzquota(8) documents every command and option of ``vzquota.cli``, simfs(8)
  every ``-o`` option ``simfs.cli`` accepts;
- both pages render with groff without a single warning;
- every vzquota command has its usage text; ``vzquota -h`` is the original's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simfs import options as simfs_options
from vzquota import cli as vz_cli
from vzquota.errors import EXIT_CODES

MAN = Path(__file__).resolve().parent.parent / "man"
VZQUOTA_8 = MAN / "vzquota.8"
SIMFS_8 = MAN / "simfs.8"
VZDQCHECK_8 = MAN / "vzdqcheck.8"
VZDQDUMP_8 = MAN / "vzdqdump.8"


def plain(roff: str) -> str:
    """Roff source with the escapes that matter here removed, so that option
    and command names can be searched for as plain text."""
    s = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", roff)     # font changes
    s = s.replace("\\-", "-").replace("\\e", "\\")
    s = s.replace("\\&", "").replace("\\%", "").replace("\\ ", " ")
    return s


def section(roff: str, title: str) -> list[str]:
    """The source lines of section ``.SH title`` (up to the next ``.SH``)."""
    lines = roff.splitlines()
    heads = [i for i, line in enumerate(lines)
             if re.fullmatch(r'\.SH\s+"?' + re.escape(title) + r'"?\s*', line)]
    assert heads, f"no section {title!r}"
    start = heads[0] + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith(".SH")),
               len(lines))
    return lines[start:end]


def tags(lines: list[str]) -> list[str]:
    """The tags of the ``.TP`` paragraphs in ``lines`` (the line after each
    ``.TP``, its macro and font escapes removed)."""
    out = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            tag = plain(lines[i + 1])
            tag = re.sub(r"^\.(B|I|BR|BI|IR|RB|IB|RI)\s+", "", tag)
            out.append(tag.replace('"', "").strip())
    return out


def has_word(text: str, word: str) -> bool:
    return re.search(r"(?<![\w.-])" + re.escape(word) + r"(?![\w])", text) is not None


@pytest.fixture(scope="module")
def vzquota_8() -> str:
    return VZQUOTA_8.read_text()


@pytest.fixture(scope="module")
def simfs_8() -> str:
    return SIMFS_8.read_text()


# ---- (a) exit codes ---------------------------------------------------------

def exit_codes_of(roff: str) -> list[int]:
    return [int(t) for t in tags(section(roff, "EXIT STATUS")) if t.isdigit()]


def test_vzquota_exit_status_matches_exit_codes(vzquota_8):
    codes = exit_codes_of(vzquota_8)
    assert len(codes) == len(set(codes)), f"a code is listed twice: {codes}"
    assert codes == sorted(codes)
    assert set(codes) == set(EXIT_CODES)


def test_vzquota_exit_status_has_no_stray_entries(vzquota_8):
    entries = tags(section(vzquota_8, "EXIT STATUS"))
    assert all(t.isdigit() for t in entries), entries


def test_simfs_exit_status(simfs_8):
    assert exit_codes_of(simfs_8) == [0, 1, 2]


# ---- (b) commands and options -------------------------------------------------

def test_every_vzquota_command_is_documented(vzquota_8):
    documented = tags(section(vzquota_8, "COMMANDS"))
    assert sorted(documented) == sorted(vz_cli.COMMANDS)
    synopsis = plain("\n".join(section(vzquota_8, "SYNOPSIS")))
    for cmd in vz_cli.COMMANDS:
        assert re.search(rf"^\.B vzquota {cmd}$", synopsis, re.M), cmd


def test_every_vzquota_option_is_documented(vzquota_8):
    options = plain("\n".join(section(vzquota_8, "OPTIONS")))
    for cmd, (shortopts, longopts) in vz_cli.OPTIONS.items():
        for long in longopts:
            assert has_word(options, "--" + long), (cmd, long)
        for short in shortopts.replace(":", ""):
            assert has_word(options, "-" + short), (cmd, short)
    for short in ("-h", "-V", "-q", "-v", "-b", "--help", "--version"):
        assert has_word(options, short), short
    for word in ("unlimited", "K", "M", "G", "T"):
        assert has_word(options, word), word


def test_vzdq_tools_are_documented():
    from vzquota import vzdq
    page = plain(VZDQDUMP_8.read_text())
    for long in (*vzdq._DUMP_LONG, "kernel", "help", "version"):
        assert has_word(page, "--" + long), long
    for short in ("-c", "-f", "-G", "-U", "-T", "-h", "-V", "-q", "-v"):
        assert has_word(page, short), short
    for label in (vzdq.STATUS_LABEL, vzdq.GRACE_LABEL, vzdq.NUMBER_LABEL, vzdq.UGID_LABEL):
        assert label in page, label
    assert "vzdqload" in page
    assert (MAN / "vzdqload.8").read_text() == ".so man8/vzdqdump.8\n"   # one page, two names
    check = plain(VZDQCHECK_8.read_text())
    for short in ("-h", "-V", "-q", "-v"):
        assert has_word(check, short), short


def test_vzquota_environment_is_documented(vzquota_8):
    env = plain("\n".join(section(vzquota_8, "ENVIRONMENT")))
    for var in ("VZQUOTA_DIR", "VZQUOTA_RUNDIR", "VZQUOTA_LOCK_WAIT", "VZQUOTA_TIMEOUT"):
        assert has_word(env, var), var


def test_every_simfs_mount_option_is_documented(simfs_8):
    options = plain("\n".join(section(simfs_8, "OPTIONS")))
    assert "quotaid" in simfs_options.SIMFS_VALUED
    for key in sorted(simfs_options.SIMFS_VALUED | simfs_options.FUSE_VALUED):
        assert has_word(options, key + "="), key
    for key in sorted(simfs_options.SIMFS_OPTIONAL):       # a value is optional: key[=VALUE]
        assert re.search(r"(?<![\w.-])" + re.escape(key) + r" ?\[=", options), key
    for flag in sorted(simfs_options.FUSE_FLAGS | simfs_options.IGNORED | {"debug"}):
        assert has_word(options, flag), flag
    for opt in ("-f", "-d", "-V"):
        assert has_word(options, opt), opt


def test_simfs_sections(simfs_8):
    for title in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "QUOTA",
                  "DF INSIDE THE CONTAINER", "SEEING YOUR OWN QUOTA FROM INSIDE",
                  "MOUNTING FROM FSTAB", "SIGNALS AND UNMOUNTING", "CRASH RECOVERY",
                  "SECURITY", "CAVEATS", "EXIT STATUS", "FILES", "SEE ALSO",
                  "PERMISSIONS, ACLS AND SET-ID BITS"):
        section(simfs_8, title)
    perms = plain("\n".join(section(simfs_8, "PERMISSIONS, ACLS AND SET-ID BITS")))
    for word in ("FUSE_POSIX_ACL", "FUSE_HANDLE_KILLPRIV_V2", "default ACL", "umask",
                 "security.capability", "XATTR_CREATE"):
        assert word in perms, word
    xattr = plain("\n".join(section(simfs_8, "SEEING YOUR OWN QUOTA FROM INSIDE")))
    assert "user.vzquota" in xattr
    assert "getfattr -n user.vzquota --only-values /" in xattr
    admin = plain("\n".join(section(simfs_8, "QUOTA ADMINISTRATION FROM INSIDE")))
    for word in ("user.vzquota.admin", "quota_admin", "EPERM", "myquota setquota",
                 "myquota repquota", "myquota quota"):
        assert word in admin, word


# ---- (c) groff renders both pages without warnings ----------------------------

@pytest.mark.parametrize("page", [VZQUOTA_8, SIMFS_8, VZDQCHECK_8, VZDQDUMP_8],
                         ids=lambda p: p.name)
def test_groff_has_no_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


# ---- (d) the usage texts ------------------------------------------------------

def test_help_is_the_originals_usage(capsys):
    # parse_global_options() of the original: -h without a command is usage(),
    # on stderr with exit status 2
    assert vz_cli.main(["-h"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", vz_cli.USAGE)


def test_every_command_has_a_usage_text():
    assert set(vz_cli.USAGES) == set(vz_cli.COMMANDS) == set(vz_cli.HANDLERS)
    for cmd, text in vz_cli.USAGES.items():
        assert f"vzquota {cmd} " in text, cmd
        assert text.endswith("\n"), cmd


def test_vzquota_8_lists_its_differences_from_the_original():
    """Issue 18: a "differences from vzquota 3.x" section, each entry with its
    reason; among them what import does not keep (the per-object status)."""
    roff = VZQUOTA_8.read_text()
    lines = section(roff, "DIFFERENCES FROM VZQUOTA 3.x")
    assert lines, "vzquota(8) has no DIFFERENCES FROM VZQUOTA 3.x section"
    text = plain("\n".join(lines))
    entries = [e for e in text.split(".TP\n")[1:]]
    assert len(entries) >= 8
    for e in entries:                                  # a title, then the reason
        assert len(e.splitlines()) >= 3, e
    for words in ("status flags", "grace times start at a week", "Locks wait",
                  "Accounting lives in the mount", "Numbers that do not fit"):
        assert words in text, words
    imp = plain(roff[roff.index(".B import\nMake the quota file"):])
    assert "per-object status flags" in imp.split(".SH")[0]


def test_simfs8_resources_lists_every_tunable_of_the_config_field_for_field():
    """Issue 20 item 3: one configuration object for every tunable, and
    simfs(8)'s RESOURCES section matches it: each field, in order, with its
    default and, where a mount option sets it, that option."""
    import dataclasses
    import re

    from simfs.config import Config
    text = (Path(__file__).parent.parent / "man" / "simfs.8").read_text()
    section = text[text.index(".SH RESOURCES"):text.index(".SH PASSTHROUGH READS")]
    listed = re.findall(r'^\.BR (\w+) " \(" (\S+) \)\n(.*?)(?=^\.TP|\Z)', section, re.M | re.S)
    fields = dataclasses.fields(Config)
    assert [name for name, _, _ in listed] == [f.name for f in fields]
    for (name, default, doc), f in zip(listed, fields):
        d = f.default
        assert default == (str(d) if isinstance(d, int) else f"{d:g}"), name
        opt = f.metadata["option"]
        assert (opt is not None) == ("the mount option" in doc), name
        if opt is not None:
            assert f".BR {opt} ." in doc, name
