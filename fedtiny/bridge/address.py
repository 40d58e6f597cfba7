"""Device addresses of the bridge: where a bridged device is and how the bridge reaches it.

Three forms (docs/protocol.md, docs/guide/devices.md):

- ``HOST:PORT``: a device (or ``fedtiny device-emulator``) listening on TCP; one connection per round,
  the device speaks first.
- ``serial:HOST:PORT``: a serial line behind a TCP port (QEMU's ``-serial tcp:...``, a serial server).
- ``serial:PATH`` or ``serial:PATH@BAUD``: a serial port of this machine opened with pyserial
  (``serial:/dev/ttyACM0``, ``serial:/dev/ttyUSB0@921600``, ``serial:COM3@115200``); 115200 baud
  unless given.

On both serial forms the bridge opens each exchange with a HELLO of its own. This module only
parses (no I/O, no pyserial import), so the scenario schema can validate addresses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedtiny.errors import ProtocolError

__all__ = ["Address", "parse_address", "address_problem", "DEFAULT_BAUD", "FORMS"]

DEFAULT_BAUD = 115200
FORMS = "HOST:PORT, serial:HOST:PORT, serial:/dev/PORT[@BAUD] or serial:COMn[@BAUD]"
_WINDOWS_PORT = re.compile(r"^(\\\\\.\\)?COM[0-9]+$", re.IGNORECASE)


@dataclass(frozen=True)
class Address:
    """A parsed device address.

    Attributes
    ----------
    text
        The address as written (for messages).
    kind
        ``tcp`` (a device on TCP), ``serial-tcp`` (a serial line behind a TCP port) or
        ``serial-port`` (a serial port of this machine).
    host, port
        The TCP endpoint (``tcp``, ``serial-tcp``).
    path, baud
        The serial port and its baud rate (``serial-port``).
    """

    text: str
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    baud: int = 0

    @property
    def serial(self) -> bool:
        """A serial line (no connections): the bridge opens each exchange with its HELLO."""
        return self.kind != "tcp"


def _host_port(text: str, rest: str, kind: str) -> Address:
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(f"device address {text!r}: expected {FORMS}")
    host = host.strip("[]") or "127.0.0.1"  # [::1]:7000 names an IPv6 host
    return Address(text, kind, host=host, port=int(port))


def parse_address(address: str) -> Address:
    """Parse a device address.

    Raises
    ------
    ProtocolError
        When ``address`` has none of the forms, naming it (an empty port path, a baud rate
        that is not a positive integer, a port number out of range).
    """
    if not isinstance(address, str):
        raise ProtocolError(f"device address {address!r}: expected a string ({FORMS})")
    text = address.strip()
    if not text.startswith("serial:"):
        return _host_port(address, text, "tcp")
    rest = text.removeprefix("serial:")
    path, at, baud = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if path.startswith("/") or _WINDOWS_PORT.match(path):
        if at and not (baud.isdigit() and 0 < int(baud) <= 100_000_000):
            raise ProtocolError(
                f"device address {address!r}: the baud rate after '@' must be a positive integer "
                f"(e.g. serial:{path}@{DEFAULT_BAUD}), got {baud!r}"
            )
        if path.endswith("/"):
            raise ProtocolError(f"device address {address!r}: {path!r} is a folder, not a serial port")
        return Address(address, "serial-port", path=path, baud=int(baud) if at else DEFAULT_BAUD)
    if at or not rest:
        raise ProtocolError(
            f"device address {address!r}: a serial port is a device path (serial:/dev/ttyACM0) or a "
            f"Windows port (serial:COM3), optionally @BAUD; expected {FORMS}"
        )
    return _host_port(address, rest, "serial-tcp")


def address_problem(address: object) -> str | None:
    """Why ``address`` is not a device address (``None`` when it is one): for the scenario schema."""
    try:
        parse_address(address)  # type: ignore[arg-type]
    except ProtocolError as exc:
        return str(exc)
    return None
