"""The project's modules import one another without cycles, and no command
is used as a library (issue 20, item 5).

Read from the source, not by importing: every ``import`` and ``from ... import``
anywhere in a module's syntax tree counts, at its top or inside a function (a
lazy import that closes a cycle is still a cycle: the two modules cannot be
understood, tested or changed apart)."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fusewire", "simfs", "vzquota")


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules ``name`` imports (a package's ``__init__`` only
    when it is named itself: ``from . import x`` names the module x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                if node.module:
                    base = f"{base}.{node.module}"
            else:
                base = node.module
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    out.add(f"{base}.{a.name}")
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_detector_finds_a_cycle_and_a_lazy_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # a lazy import inside a function counts: simfs/cli.py and forkserver.py did this
    f = tmp_path / "forkserver.py"
    f.write_text("import os\n\ndef child():\n    from . import cli\n    from .cli import x\n")
    assert imports("simfs.forkserver", f, {"simfs.cli", "simfs.forkserver"}) == {"simfs.cli"}


def test_every_module_is_seen():
    edges = graph()
    assert {"simfs.cli", "simfs.forkserver", "vzquota.cli", "vzquota.vzdq",
            "fusewire.session"} <= set(edges)
    assert "simfs.daemon" in edges["simfs.forkserver"]     # the graph is not empty
    assert "vzquota.cmdline" in edges["vzquota.vzdq"]


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def commands() -> set[str]:
    """The modules behind the installed commands ([project.scripts])."""
    with open(REPO / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {target.split(":")[0] for target in scripts.values()}


def test_no_command_is_used_as_a_library():
    """A command module (one behind an installed command) is imported by no
    other module of the project: what two commands share lives in a module
    both import (vzquota/cmdline.py, simfs/options.py, simfs/daemon.py ...)."""
    cmds = commands()
    assert {"simfs.cli", "vzquota.cli", "vzquota.vzdq", "simfs.unit"} <= cmds
    edges = graph()
    bad = sorted(f"{m} imports {c}" for m, deps in edges.items() for c in deps & cmds)
    assert not bad, bad


def test_the_mount_command_path_imports_almost_nothing():
    """``simfs PRIVATE ROOT`` with a mount service running imports, of the
    project, only the command, its client and the run directory's module;
    of the standard library nothing that costs (no argparse, json, socket,
    logging, re)."""
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import simfs.cli, simfs.client, vzquota.rundir\n"
            "new = sorted(set(sys.modules) - before)\n"
            "print(' '.join(new))\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    new = set(r.stdout.split())
    assert new <= {"simfs", "simfs.cli", "simfs.client", "vzquota", "vzquota.rundir"}, new


def test_only_a_plain_mount_takes_the_lean_path():
    """What the lean path sends to the service unparsed: two paths and ``-o``
    words; anything else (a flag, a remount, a value that looks like an
    option, a third word) is parsed by the command itself, as before."""
    from simfs.cli import plain_mount
    for argv in (["p", "r"], ["p", "r", "-o", "dev,suid,quotaid=5"],
                 ["-o", "ro", "p", "r", "-o", "quotaid=5"]):
        assert plain_mount(argv), argv
    for argv in (["p"], ["p", "r", "x"], ["p", "r", "-f"], ["p", "r", "-d"],
                 ["--service"], ["-V"], ["p", "r", "-o"], ["p", "r", "-o", "-f"],
                 ["p", "r", "-ofoo"], ["p", "r", "-o", "ro,remount"], ["p", ""],
                 ["p", "r", "--help"]):
        assert not plain_mount(argv), argv
