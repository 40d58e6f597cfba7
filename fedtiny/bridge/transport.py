"""Byte streams the bridge protocol runs on: a TCP socket, a serial port (pyserial), a file descriptor.

:class:`Stream` is all :mod:`fedtiny.bridge.protocol` and the relay need: ``read`` (some bytes, or
none when ``timeout`` seconds pass without one), ``write``, ``discard_input`` (drop what a serial line
left over) and ``close``. :func:`open_stream` opens the stream of a device address
(:mod:`fedtiny.bridge.address`). A stream that ends or fails raises :class:`ProtocolError` naming it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from abc import ABC, abstractmethod

from fedtiny.bridge.address import Address, parse_address
from fedtiny.errors import ProtocolError, StreamClosed

__all__ = ["Stream", "SocketStream", "SerialStream", "FdStream", "open_stream", "as_stream"]


class Stream(ABC):
    """A byte stream to a device, with a push-back buffer for bytes read ahead.

    Attributes
    ----------
    name
        What the stream is connected to, for messages (the device address, a port).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._ahead = bytearray()

    def read(self, n: int, timeout: float | None) -> bytes:
        """Between 1 and ``n`` bytes; ``b""`` when none arrived within ``timeout`` seconds (``None``: wait).

        Raises
        ------
        ProtocolError
            :class:`~fedtiny.errors.StreamClosed` when the stream was closed by the peer or failed.
        """
        if self._ahead:
            out = bytes(self._ahead[:n])
            del self._ahead[:n]
            return out
        return self._read(n, timeout)

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the stream (the next ``read`` returns it first)."""
        self._ahead[:0] = data

    def discard_input(self) -> None:
        """Drop every byte received and not read yet (a serial line's leftovers)."""
        self._ahead.clear()
        self._discard()

    @abstractmethod
    def _read(self, n: int, timeout: float | None) -> bytes: ...

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Write all of ``data``; a failure raises :class:`ProtocolError`."""

    @abstractmethod
    def _discard(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Close the stream (idempotent)."""

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SocketStream(Stream):
    """A connected TCP socket (or a socketpair end)."""

    def __init__(self, sock: socket.socket, name: str = "") -> None:
        super().__init__(name or _peer(sock))
        self.sock = sock

    def _read(self, n: int, timeout: float | None) -> bytes:
        try:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(n)
        except socket.timeout:
            return b""
        except OSError as exc:
            raise StreamClosed(f"connection to {self.name} failed: {exc}") from None
        if not chunk:
            raise StreamClosed(f"connection to {self.name} closed")
        return chunk

    def write(self, data: bytes) -> None:
        try:
            self.sock.settimeout(None)
            self.sock.sendall(data)
        except OSError as exc:
            raise StreamClosed(f"connection to {self.name} failed while sending: {exc}") from None

    def _discard(self) -> None:
        try:
            self.sock.setblocking(False)
            while self.sock.recv(1 << 16):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # a closed or broken connection: the next read says so
        finally:
            try:
                self.sock.setblocking(True)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def _peer(sock: socket.socket) -> str:
    try:
        host, port, *_ = sock.getpeername()
        return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return "a socket"


class SerialStream(Stream):
    """A serial port of this machine opened with pyserial (a USB CDC-ACM board, a USB-UART adapter)."""

    def __init__(self, path: str, baud: int, name: str = "") -> None:
        super().__init__(name or f"serial:{path}@{baud}")
        try:
            import serial  # needed only when a serial port is opened; a missing pyserial is reported below
        except ImportError:  # a dependency of fedtiny; a broken install
            raise ProtocolError(f"{self.name}: pyserial is not installed (pip install pyserial==3.5)") from None
        self._errors = serial.SerialException
        try:
            # exclusive: a second bridge (or a serial monitor using pyserial) on the port is refused
            self.port = serial.Serial(path, baudrate=baud, timeout=None, write_timeout=None, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ProtocolError(f"serial port {path!r} (device address {self.name}): cannot open it: {exc}") from None

    def _read(self, n: int, timeout: float | None) -> bytes:
        try:
            if self.port.timeout != timeout:  # a change reconfigures the port: only when it changes
                self.port.timeout = timeout
            first = self.port.read(1)
            if not first:
                return b""
            waiting = self.port.in_waiting
            return first + (self.port.read(min(n - 1, waiting)) if n > 1 and waiting else b"")
        except (self._errors, OSError) as exc:
            raise StreamClosed(f"serial port {self.port.port!r} failed: {exc}") from None

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except (self._errors, OSError) as exc:
            raise StreamClosed(f"serial port {self.port.port!r} failed while sending: {exc}") from None

    def _discard(self) -> None:
        try:
            self.port.reset_input_buffer()
        except (self._errors, OSError) as exc:
            raise StreamClosed(f"serial port {self.port.port!r} failed: {exc}") from None

    def close(self) -> None:
        self.port.close()


class FdStream(Stream):
    """A POSIX file descriptor (a pseudo-terminal's master, a pipe pair): the device emulator's serial end.

    The descriptor is not closed by :meth:`close` unless ``owns`` is set.
    """

    def __init__(self, fd: int, name: str = "", *, write_fd: int | None = None, owns: bool = False) -> None:
        super().__init__(name or f"fd {fd}")
        self.fd, self.write_fd, self.owns = fd, fd if write_fd is None else write_fd, owns

    def _read(self, n: int, timeout: float | None) -> bytes:
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return b""
            chunk = os.read(self.fd, n)
        except OSError as exc:
            if exc.errno == errno.EIO:  # a pseudo-terminal whose other side closed
                raise StreamClosed(f"{self.name} closed") from None
            raise StreamClosed(f"{self.name} failed: {exc}") from None
        if not chunk:
            raise StreamClosed(f"{self.name} closed")
        return chunk

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                select.select([], [self.write_fd], [])
                view = view[os.write(self.write_fd, view) :]
        except OSError as exc:
            raise StreamClosed(f"{self.name} failed while sending: {exc}") from None

    def _discard(self) -> None:
        while self._read(1 << 16, 0):
            pass

    def close(self) -> None:
        if self.owns and self.fd >= 0:
            os.close(self.fd)
            if self.write_fd != self.fd:
                os.close(self.write_fd)
            self.fd = self.write_fd = -1


def open_stream(address: str | Address, timeout: float) -> Stream:
    """Open the stream of a device address (TCP connection within ``timeout`` seconds, or a serial port).

    Raises
    ------
    ProtocolError
        When the address is malformed, the device cannot be reached, or the serial port does not
        exist or cannot be opened (the message names it).
    """
    addr = address if isinstance(address, Address) else parse_address(address)
    if addr.kind == "serial-port":
        return SerialStream(addr.path, addr.baud, addr.text)
    try:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        raise ProtocolError(f"cannot reach the device at {addr.text}: {exc}") from None
    return SocketStream(sock, addr.text)


def as_stream(obj: Stream | socket.socket) -> Stream:
    """A :class:`Stream` as is; a socket wrapped (for callers that hold a bare socket)."""
    return obj if isinstance(obj, Stream) else SocketStream(obj)
