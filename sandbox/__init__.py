"""Sandboxing of device processes.

namespaces.isolate() runs first thing in a device process (before any
thread); jail.enter(policy, mode) runs once the device is set up. Policies
live in seccomp_policy (base) and devices/<kind>/policy.py. Submodules are
not imported here: isolate() must not pull in pyseccomp's library probing
before the fork.
"""
