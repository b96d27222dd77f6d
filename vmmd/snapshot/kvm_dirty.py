"""KVM's dirty log of the RAM memslots, in one of two modes.

manual (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, used when KVM offers it):
KVM_GET_DIRTY_LOG only reads the bitmap; KVM_CLEAR_DIRTY_LOG clears chosen
bits and write-protects those pages again. A sender clears a chunk right
before it reads that chunk's pages (as QEMU does): a write after the clear
sets the bit again (next pass), a write between the read of the log and the
clear lands before the page is read, so no write is lost; and the pages of
a chunk not sent yet stay writable without faults. With
KVM_DIRTY_LOG_INITIALLY_SET, turning logging on sets every bit instead of
write-protecting all memory at once: the first pass clears chunk by chunk.

classic: KVM_GET_DIRTY_LOG reads the bitmap and write-protects every page
of the slot at once; clear() has nothing to do.

The environment variable VMMD_KVM_DIRTY_LOG=classic|manual forces a mode
(tests; `manual` fails when KVM does not offer it); unset or `auto` picks
manual when offered.
"""

from __future__ import annotations

import os

import numpy as np

from vmmd.kvm import abi

PAGE = 4096
MODE_ENV = "VMMD_KVM_DIRTY_LOG"
MODES = ("auto", "manual", "classic")


class KvmDirtyLogError(Exception):
    pass


def _bits(mask: np.ndarray) -> bytes:
    return np.packbits(mask, bitorder="little").tobytes()


class KvmDirtyLog:
    """Dirty logging of `memory`'s regions (memslot n = region n) on `vm`.
    Masks are numpy bool arrays indexed by memfd page number."""

    def __init__(self, vm, memory, mode: str | None = None):
        self.vm, self.memory = vm, memory
        want = mode or os.environ.get(MODE_ENV) or "auto"
        if want not in MODES:
            raise KvmDirtyLogError(f"{MODE_ENV}={want!r}: expected one of {', '.join(MODES)}")
        offered = 0 if want == "classic" else vm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        if want == "manual" and not offered & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            raise KvmDirtyLogError("KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        self.manual = bool(offered & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.initially_set = self.manual and bool(offered & abi.KVM_DIRTY_LOG_INITIALLY_SET)
        self.clears = 0  # KVM_CLEAR_DIRTY_LOG calls (tests, status)

    @property
    def mode(self) -> str:
        return "manual" if self.manual else "classic"

    def enable(self) -> None:
        """Logging on for every RAM memslot (manual protect first: it decides
        what turning logging on does)."""
        if self.manual:
            flags = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if self.initially_set:
                flags |= abi.KVM_DIRTY_LOG_INITIALLY_SET
            self.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [flags])
        mem = self.memory
        for slot, region in enumerate(mem.layout.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, mem.host_address(region),
                                           abi.KVM_MEM_LOG_DIRTY_PAGES)

    def get(self) -> np.ndarray:
        """Pages whose bit is set. Classic mode: those pages are write-protected
        again and their bits reset; manual mode: nothing changes (clear())."""
        mem = self.memory
        mask = np.zeros(mem.size // PAGE, dtype=bool)
        for slot, region in enumerate(mem.layout.regions):
            n = region.size // PAGE
            bits = np.unpackbits(np.frombuffer(self.vm.get_dirty_log(slot, n), dtype=np.uint8),
                                 count=n, bitorder="little").astype(bool)
            mask[region.offset // PAGE:region.offset // PAGE + n] |= bits
        return mask

    def clear(self, mask: np.ndarray, first: int, count: int) -> None:
        """Manual mode: reset the bits of the pages in [first, first+count)
        (memfd pages) that are set in mask (the same indexing), write-protecting
        them again. Call right before reading those pages. Classic: no-op."""
        if not self.manual or count <= 0:
            return
        end = first + count
        for slot, region in enumerate(self.memory.layout.regions):
            r0, n = region.offset // PAGE, region.size // PAGE
            lo, hi = max(first, r0), min(end, r0 + n)
            if lo >= hi or not mask[lo:hi].any():
                continue
            # KVM wants first_page a multiple of 64 and num_pages one too unless
            # it reaches the end of the slot: widen, with the extra bits zero.
            s0 = (lo - r0) // 64 * 64
            s1 = min(n, -(-(hi - r0) // 64) * 64)
            sel = np.zeros(s1 - s0, dtype=bool)
            sel[lo - r0 - s0:hi - r0 - s0] = mask[lo:hi]
            self.vm.clear_dirty_log(slot, s0, s1 - s0, _bits(sel))
            self.clears += 1

    def reset(self) -> None:
        """Every bit reset, every page write-protected (call with the vCPUs
        stopped: it is a fresh start for both modes)."""
        mask = self.get()
        self.clear(np.ones_like(mask), 0, len(mask))
