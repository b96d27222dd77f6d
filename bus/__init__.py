"""The device bus: names (types), wire format (protocol), zmq plumbing (endpoint).

Deliberately empty of imports: device processes import bus.types before
their sandbox is set up, and must not pull in zmq with it.
"""
