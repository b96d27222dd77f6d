"""Live migration: the sans-I/O protocol (protocol.py), the source's precopy
(source.py), the destination's `vmmd --incoming` (incoming.py), transports
(transport.py). docs/migration.md describes them."""
