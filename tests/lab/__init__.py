"""The nested test lab: a hardware-style /dev/kvm on hosts that lack one.

QEMU in software emulation (TCG, ``-cpu max``) presents an AMD CPU with SVM
and nested paging; a Debian generic kernel booted in it loads ``kvm_amd``.
virtme-ng boots that kernel with the host's root file system over 9p
(copy-on-write overlays where tests write) and runs a command inside.
See docs/lab.md.
"""
