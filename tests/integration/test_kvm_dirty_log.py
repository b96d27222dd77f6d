"""vmmd.snapshot.kvm_dirty against the real /dev/kvm, in both modes.

A real-mode guest sweeps 240 pages writing a counter into each, over and
over, while the test runs precopy passes exactly as the migration sender
does (harvest; per window: clear, then copy the window's dirty pages to a
"destination" buffer). When the guest has stopped, a last pass must leave
the destination equal to guest RAM: no page written during the passes may
be lost, whether KVM runs in manual-protect mode (clear per window) or in
the classic mode (the harvest re-protects everything at once).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from vmmd.guest_memory import GuestMemory
from vmmd.kvm import Kvm, abi
from vmmd.snapshot.kvm_dirty import MODE_ENV, KvmDirtyLog, KvmDirtyLogError

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

PAGE = 4096
MEM = 1 << 20          # real mode reaches 1 MiB
ENTRY = 0x1000
STOP_FLAG = 0x0800     # the guest halts after a sweep once this byte is non-zero
WINDOW = 64            # pages per clear: several windows per pass
FIRST_PAGE, END_PAGE = 0x10, 0x100


def sweeper() -> bytes:
    """xor ebx,ebx; outer: inc ebx; for es in 0x1000..0xff00 step 0x100: mov [es:0],ebx;
    if [STOP_FLAG] == 0: goto outer; hlt"""
    code = bytearray(b"\x66\x31\xdb")                      # xor ebx, ebx
    outer = len(code)
    code += b"\x66\x43"                                    # inc ebx
    code += b"\xb8\x00\x10"                                # mov ax, 0x1000
    inner = len(code)
    code += b"\x8e\xc0"                                    # mov es, ax
    code += b"\x26\x66\x89\x1e\x00\x00"                    # mov es:[0], ebx
    code += b"\x05\x00\x01"                                # add ax, 0x100
    code += b"\x75" + bytes([(inner - (len(code) + 2)) & 0xFF])  # jnz inner (ax wrapped: done)
    code += b"\x80\x3e" + STOP_FLAG.to_bytes(2, "little") + b"\x00"  # cmp byte [STOP_FLAG], 0
    code += b"\x74" + bytes([(outer - (len(code) + 2)) & 0xFF])  # jz outer
    code += b"\xf4"                                        # hlt
    return bytes(code)


class Run:
    def __init__(self, mode: str):
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.mem = GuestMemory.create(MEM)
        self.log = KvmDirtyLog(self.vm, self.mem, mode=mode)
        self.log.enable()  # creates the memslot with dirty logging on
        self.vcpu = self.vm.create_vcpu(0)
        self.mem.write(ENTRY, sweeper())
        sregs = self.vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es):
            seg.base, seg.selector = 0, 0
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(abi.kvm_regs(rip=ENTRY, rflags=0x2))
        self.exit_reason = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.exit_reason = self.vcpu.run()

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.mem.close()


def copy_pass(run: Run, dest: bytearray, mask: np.ndarray) -> int:
    """One sender pass: per window, clear the window's bits, then copy its dirty pages."""
    view = run.mem._view
    for w in range(0, len(mask), WINDOW):
        sub = mask[w:w + WINDOW]
        if not sub.any():
            continue
        run.log.clear(mask, w, len(sub))
        for p in np.flatnonzero(sub):
            off = (w + int(p)) * PAGE
            dest[off:off + PAGE] = view[off:off + PAGE]
    return int(mask.sum())


@pytest.mark.parametrize("mode", ["manual", "classic"])
def test_no_dirty_page_lost_while_the_guest_writes(mode):
    try:
        run = Run(mode)
    except KvmDirtyLogError as exc:
        pytest.skip(f"KVM here: {exc}")
    try:
        assert run.log.mode == mode
        dest = bytearray(MEM)
        run.thread.start()
        # First pass: everything, window by window (manual: each window cleared first).
        everything = np.ones(MEM // PAGE, dtype=bool)
        copy_pass(run, dest, everything)
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(seen) < 20 or sum(1 for n in seen if n) < 5):
            time.sleep(0.002)
            seen.append(copy_pass(run, dest, run.log.get()))
        run.mem.write(STOP_FLAG, b"\1")
        run.thread.join(30)
        assert not run.thread.is_alive(), "the guest did not stop"
        copy_pass(run, dest, run.log.get())  # the last pass, guest stopped
        ram = bytes(run.mem._view)
        counters = [int.from_bytes(ram[p * PAGE:p * PAGE + 4], "little") for p in range(FIRST_PAGE, END_PAGE)]
        assert min(counters) >= 2, "the guest did not keep writing during the passes"
        assert sum(1 for n in seen if n) >= 5, f"too few passes saw guest writes: {seen}"
        # (page 0 holds the stop flag the host wrote: KVM logs guest writes only)
        lost = [p for p in range(1, MEM // PAGE) if dest[p * PAGE:(p + 1) * PAGE] != ram[p * PAGE:(p + 1) * PAGE]]
        assert not lost, f"pages lost in {mode} mode: {lost[:10]}"
        if mode == "manual":
            assert run.log.clears > 0
            assert not run.log.get()[FIRST_PAGE:END_PAGE].any()  # cleared: the guest is stopped
        else:
            assert run.log.clears == 0
    finally:
        run.close()


def test_manual_mode_keeps_bits_until_cleared_and_initially_set():
    try:
        run = Run("manual")
    except KvmDirtyLogError as exc:
        pytest.skip(f"KVM here: {exc}")
    try:
        if run.log.initially_set:  # every bit set when logging starts: nothing write-protected yet
            assert run.log.get().all()
        run.log.reset()
        assert not run.log.get().any()
        run.mem.write(STOP_FLAG, b"\1")  # one sweep, then halt
        run.thread.start()
        run.thread.join(30)
        first = run.log.get()
        assert first[FIRST_PAGE:END_PAGE].all()
        assert (run.log.get() == first).all()  # reading does not clear
        half = np.zeros_like(first)
        half[FIRST_PAGE:0x80] = True
        run.log.clear(half, FIRST_PAGE + 1, 0x80 - FIRST_PAGE - 1)  # not page FIRST_PAGE: outside the range
        now = run.log.get()
        assert now[FIRST_PAGE] and not now[FIRST_PAGE + 1:0x80].any() and now[0x80:END_PAGE].all()
    finally:
        run.close()


def test_mode_choice(monkeypatch):
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory.create(MEM)
    try:
        offered = vm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        monkeypatch.delenv(MODE_ENV, raising=False)
        assert KvmDirtyLog(vm, mem).mode == ("manual" if offered else "classic")
        monkeypatch.setenv(MODE_ENV, "classic")
        assert KvmDirtyLog(vm, mem).mode == "classic"
        monkeypatch.setenv(MODE_ENV, "bogus")
        with pytest.raises(KvmDirtyLogError, match=MODE_ENV):
            KvmDirtyLog(vm, mem)
    finally:
        vm.close()
        kvm.close()
        mem.close()
