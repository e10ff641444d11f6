"""simfs: a FUSE passthrough that mounts a container's private area at its root,
enforces the vzquota quotas on every allocating call and fakes ``statfs``.

Only ``ops``, ``mount`` and ``cli`` import pyfuse3/anyio; ``lower`` and ``statfs``
are plain Python over the backing tree.
"""

__version__ = "0.1.0"
