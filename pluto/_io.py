"""The producer's socket I/O, which keeps the GIL unless it really has to wait.

CPython releases the GIL around every socket call. While the training loop runs flat out, a
thread that gave the GIL away gets it back only after the switch interval (5 ms), so a producer
making two socket calls per chunk spent most of its turn waiting for the GIL, fell behind, and
the backlog (memory) grew with the loop's speed. Non-blocking ``send``/``recv`` called through
``ctypes.PyDLL`` keep the GIL (they return at once, done or ``EAGAIN``); only a real wait
(``poll``) releases it. Where libc cannot be loaded or the socket is not a plain one (TLS),
the ordinary socket methods are used.
"""

from __future__ import annotations

import ctypes
import errno
import select
import socket
from typing import Any

_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0) if hasattr(select, "poll") else 0
_RECV_SIZE = 262_144


def _load_libc() -> Any:
    if not _DONTWAIT:
        return None
    try:
        libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the call does not release the GIL
        send, recv = libc.send, libc.recv
    except (OSError, AttributeError):
        return None
    send.argtypes = recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    send.restype = recv.restype = ctypes.c_ssize_t
    return libc


_LIBC = _load_libc()


class Wire:
    """Send bytes / receive bytes on one connected socket, honouring its timeout."""

    def __init__(self, sock: socket.socket, raw: bool = True) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()
        self.raw = raw and _LIBC is not None and type(sock) is socket.socket
        if self.raw:
            self._fd = sock.fileno()
            self._buffer = ctypes.create_string_buffer(_RECV_SIZE)

    def send(self, data: bytes) -> None:
        if not self.raw:
            self._sock.sendall(data)
            return
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0  # no copy
        sent, size = 0, len(data)
        while sent < size:
            n = _LIBC.send(self._fd, base + sent, size - sent, _DONTWAIT)
            if n >= 0:
                sent += n
            else:
                self._wait(ctypes.get_errno(), write=True)

    def recv(self) -> bytes:
        """What has arrived (waiting for at least one byte); b"" never: a closed peer raises."""
        if not self.raw:
            chunk = self._sock.recv(_RECV_SIZE)
        else:
            while (n := _LIBC.recv(self._fd, self._buffer, _RECV_SIZE, _DONTWAIT)) < 0:
                self._wait(ctypes.get_errno(), write=False)
            chunk = ctypes.string_at(self._buffer, n)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        return chunk

    def _wait(self, code: int, write: bool) -> None:
        """After EAGAIN: block (GIL released) until the socket is ready, within its timeout."""
        if code == errno.EINTR:
            return
        if code not in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise OSError(code, f"{'send' if write else 'recv'} to Redis failed: "
                                f"{errno.errorcode.get(code, code)}")
        poller = select.poll()  # not select(): a training process may hold > 1024 descriptors
        poller.register(self._fd, select.POLLOUT if write else select.POLLIN)
        if not poller.poll(None if self._timeout is None else self._timeout * 1000):
            raise TimeoutError(f"Redis did not {'accept' if write else 'answer'} within "
                               f"{self._timeout} s")
