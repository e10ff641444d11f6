"""``sd_notify``: tell systemd (``Type=notify``) how a service is doing, over
the datagram socket ``$NOTIFY_SOCKET`` names; a no-op without it.  Used by the
daemon, the mount service and the unit's watcher (``simfs-service start``), so
it imports only ``os`` and ``_socket``."""

from __future__ import annotations

import os


def notify(state: str, env: dict[str, str] | None = None) -> str | None:
    """Send ``state`` (``READY=1``, ``STATUS=...`` lines); the reason when it
    could not be sent, else None."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    import _socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        s.connect(addr)
        s.sendall(state.encode())
    except OSError as e:
        return f"cannot notify systemd at {addr}: {e.strerror or e}"
    finally:
        s.close()
    return None
