"""Option parsing that behaves, and words its errors, as glibc's ``getopt_long``.

Role: the original vzquota parses its command lines with glibc's
``getopt_long``; scripts and eyes see glibc's own error lines
(``101: invalid option -- 'x'``), its unique-prefix matching of long options and
its argument permutation.  ``GetoptLong`` reproduces that for the CLI tools
(``vzquota``, ``vzdqdump``, ``vzdqload``, ``vzdqcheck``): it yields the options
one by one, in command-line order, so that a caller can stop at the first bad
value exactly where the C code would; the error lines are glibc's (2.26 and
later) texts.

Concurrency: pure; one parser object per parse, used by one thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

NO_ARG, REQUIRED = 0, 1


class GetoptError(Exception):
    """A getopt failure; ``text`` is the complete line glibc prints on stderr."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


@dataclass
class GetoptLong:
    """Parse ``argv[1:]`` (``argv[0]`` names the program in error lines).

    ``shortopts`` as in C (``"p:c:R"``; a leading ``+`` stops at the first
    non-option instead of permuting); ``longopts`` maps a long name to
    ``(has_arg, key)`` where ``key`` is what the option yields (usually the
    short letter).  Iterate to get ``(key, value)`` pairs; afterwards ``rest``
    holds the non-option arguments in their original order.
    """

    argv: list[str]
    shortopts: str
    longopts: dict[str, tuple[int, str]] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)

    def _short(self) -> tuple[dict[str, int], bool]:
        spec = self.shortopts
        in_order = spec.startswith("+")
        spec = spec.lstrip("+")
        table: dict[str, int] = {}
        i = 0
        while i < len(spec):
            ch = spec[i]
            has = REQUIRED if spec[i + 1:i + 2] == ":" else NO_ARG
            table[ch] = has
            i += 2 if has else 1
        return table, in_order

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        prog = self.argv[0] if self.argv else ""
        args = self.argv[1:]
        short, in_order = self._short()
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg == "--":
                self.rest.extend(args[i:])
                return
            if not arg.startswith("-") or arg == "-":
                if in_order:
                    self.rest.extend(args[i - 1:])
                    return
                self.rest.append(arg)
                continue
            if arg.startswith("--"):
                name, eq, value = arg[2:].partition("=")
                match = self._long(prog, name, arg[2:])
                has, key = self.longopts[match]
                if has == NO_ARG:
                    if eq:
                        raise GetoptError(f"{prog}: option '--{match}' doesn't allow "
                                          "an argument\n")
                    yield key, None
                    continue
                if not eq:
                    if i >= len(args):
                        raise GetoptError(f"{prog}: option '--{match}' requires an "
                                          "argument\n")
                    value = args[i]
                    i += 1
                yield key, value
                continue
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                if ch not in short or ch == ":":
                    raise GetoptError(f"{prog}: invalid option -- '{ch}'\n")
                if short[ch] == NO_ARG:
                    yield ch, None
                    continue
                if j < len(arg):
                    value = arg[j:]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    raise GetoptError(f"{prog}: option requires an argument -- '{ch}'\n")
                yield ch, value
                break

    def _long(self, prog: str, name: str, typed: str) -> str:
        """The long option ``name`` means: exact, else a unique prefix."""
        if name in self.longopts:
            return name
        found = [n for n in self.longopts if n.startswith(name)]
        if not found:
            raise GetoptError(f"{prog}: unrecognized option '--{typed}'\n")
        first = self.longopts[found[0]]
        if all(self.longopts[n] == first for n in found):
            return found[0]
        ambiguous = [n for n in found if self.longopts[n] != first] + [found[0]]
        listed = "".join(f" '--{n}'" for n in self.longopts if n in ambiguous)
        raise GetoptError(f"{prog}: option '--{typed}' is ambiguous; possibilities:"
                          f"{listed}\n")
