"""Snapshots of a whole VM (docs/snapshot.md).

format.py and ram.py are sans-I/O (the manifest, sections, their versions and
checksums; guest RAM as page runs with a canonical digest) so live migration
can put the same sections on a stream; store.py is the directory I/O,
machine_state.py reads and writes KVM state, clock.py the guest-time rules.
"""
