"""Taking a TCP port to listen on before anything else starts, so a busy one is the first,
clear error (uvicorn exits from inside its task, with status 3 and no word on what to do)."""

from __future__ import annotations

import errno
import socket

from dsproxy.errors import ConfigError

__all__ = ["LISTEN_BACKLOG", "bind_port"]

LISTEN_BACKLOG = 2048  # uvicorn's default


def bind_port(host: str, port: int, *, hint: str) -> socket.socket:
    """A socket bound to (host, port); `hint` tells the user how to pick another port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on the connections of a socket it knows is TCP
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)  # at once: with SO_REUSEADDR a bound, idle port can be taken
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use: stop what listens there, or {hint}"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
