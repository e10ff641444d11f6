"""simfs: a FUSE passthrough that mounts a container's private area at its root,
enforces the vzquota quotas on every allocating call and fakes ``statfs``.

``ops`` speaks to the FUSE binding (``binding``: the project's own ``fusewire``,
or pyfuse3 as the fallback) through fusewire's types; ``mount`` runs the event
loop (anyio); ``lower`` and ``statfs`` are plain Python over the backing tree.
"""

__version__ = "0.1.0"
