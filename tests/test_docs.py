"""The manual pages and the usage text agree with the code.

- vzquota(8) EXIT STATUS lists exactly the codes of ``vzquota.errors.EXIT_CODES``;
- vzquota(8) documents every command and option of ``vzquota.cli``, simfs(8)
  every ``-o`` option ``simfs.cli`` accepts;
- both pages render with groff without a single warning;
- ``vzquota -h`` lists every command and every exit code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from simfs import cli as simfs_cli
from vzquota import cli as vz_cli
from vzquota.errors import EXIT_CODES

MAN = Path(__file__).resolve().parent.parent / "man"
VZQUOTA_8 = MAN / "vzquota.8"
SIMFS_8 = MAN / "simfs.8"


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
    for long, short in vz_cli.LONG.items():
        assert has_word(options, "--" + long.rstrip("=")), long
        assert has_word(options, short), short
    for short in ("-h", "-V", "-q", "-v", "-b", "-R", "-t", "-g", "-u"):
        assert has_word(options, short), short
    for word in ("unlimited", "K", "M", "G", "T"):
        assert has_word(options, word), word


def test_vzquota_environment_is_documented(vzquota_8):
    env = plain("\n".join(section(vzquota_8, "ENVIRONMENT")))
    for var in ("VZQUOTA_DIR", "VZQUOTA_RUNDIR", "VZQUOTA_LOCK_WAIT"):
        assert has_word(env, var), var


def test_every_simfs_mount_option_is_documented(simfs_8):
    options = plain("\n".join(section(simfs_8, "OPTIONS")))
    assert "quotaid" in simfs_cli.SIMFS_VALUED
    for key in sorted(simfs_cli.SIMFS_VALUED | simfs_cli.FUSE_VALUED):
        assert has_word(options, key + "="), key
    for flag in sorted(simfs_cli.FUSE_FLAGS | simfs_cli.IGNORED | {"debug"}):
        assert has_word(options, flag), flag
    for opt in ("-f", "-d", "-V"):
        assert has_word(options, opt), opt


def test_simfs_sections(simfs_8):
    for title in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "QUOTA",
                  "DF INSIDE THE CONTAINER", "SEEING YOUR OWN QUOTA FROM INSIDE",
                  "MOUNTING FROM FSTAB", "SIGNALS AND UNMOUNTING", "CRASH RECOVERY",
                  "SECURITY", "CAVEATS", "EXIT STATUS", "FILES", "SEE ALSO"):
        section(simfs_8, title)
    xattr = plain("\n".join(section(simfs_8, "SEEING YOUR OWN QUOTA FROM INSIDE")))
    assert "user.vzquota" in xattr
    assert "getfattr -n user.vzquota --only-values /" in xattr


# ---- (c) groff renders both pages without warnings ----------------------------

@pytest.mark.parametrize("page", [VZQUOTA_8, SIMFS_8], ids=lambda p: p.name)
def test_groff_has_no_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    r = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


# ---- (d) the usage text -------------------------------------------------------

def test_usage_lists_every_command(capsys):
    assert vz_cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out == vz_cli.USAGE
    commands = out.split("Commands:", 1)[1]
    for cmd in vz_cli.COMMANDS:
        assert re.search(rf"^  {cmd} +(quotaid|\[--json\])", commands, re.M), cmd


def test_usage_lists_every_exit_code():
    text = vz_cli.USAGE.split("Exit status:", 1)[1]
    codes = {int(n) for n in re.findall(r"(\d+) [a-z]", text)}
    assert codes == set(EXIT_CODES)
