"""The bridge protocol between a Flower SuperNode and a microcontroller (see docs/protocol.md)."""
