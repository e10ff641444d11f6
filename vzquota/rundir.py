"""Where the live mounts' sockets and locks are: ``$VZQUOTA_RUNDIR``, else
``/run/vzquota``.  A module of its own (``os`` only) so that the ``simfs``
command's way to the mount service imports nothing else."""

from __future__ import annotations

import os

DEFAULT_RUNDIR = "/run/vzquota"


def run_dir() -> str:
    return os.environ.get("VZQUOTA_RUNDIR") or DEFAULT_RUNDIR
