"""Hostile device models: the real device programs (and their sandbox) with a
model that, once jailed, sends vmmd every kind of message a device must not
send (tests/integration/test_hostile_devices.py)."""
