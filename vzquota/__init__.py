"""vzquota: per-container disk quotas (1st level: the whole private area; 2nd level:
per uid/gid inside it), the quota file, the scanner and the ``vzquota`` command.

Pure Python: nothing in this package imports pyfuse3, trio or simfs, so every rule
is testable without a mount.
"""

__version__ = "0.1.0"
