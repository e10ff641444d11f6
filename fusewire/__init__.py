"""fusewire: the FUSE protocol spoken directly over ``/dev/fuse``, in Python.

Role: a FUSE binding with no C library: it mounts with ``mount(2)`` (the
daemon is root), negotiates INIT with whatever protocol minor the kernel
offers, decodes requests, calls a filesystem's handlers (pyfuse3's names and
signatures), encodes replies, and sends notifications.  It knows nothing of
what the filesystem does with the requests; it imports nothing from simfs or
vzquota and could be published alone.

Concurrency: see ``session`` and ``loop``: on fusewire's asyncio loop
(``loop.new_event_loop``) a reader thread blocked in read(2) answers each
request inline under the loop's lock (handlers and the loop's work never
overlap); on uvloop a reader callback, on trio a reader task.  Handlers that
never suspend are answered inline; one that suspends continues on the loop.
"""

from . import kernel
from .device import MountOptions
from .session import MAX_PENDING, MAX_WRITE, ProtocolError, Session
from .types import (EntryAttributes, FileInfo, FUSEError, ReaddirToken, RequestContext,
                    SetattrFields, StatvfsData, get_sup_groups, readdir_reply)

ROOT_INODE = kernel.ROOT_ID

__all__ = ["kernel", "MountOptions", "Session", "ProtocolError", "MAX_PENDING", "MAX_WRITE",
           "EntryAttributes", "FileInfo", "FUSEError", "ReaddirToken", "RequestContext",
           "SetattrFields", "StatvfsData", "get_sup_groups", "readdir_reply", "ROOT_INODE"]
