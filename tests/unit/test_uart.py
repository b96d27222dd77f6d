"""16550A register model: the probing Linux's 8250 driver does, and the chip's rules."""

import pytest

from devices.lpc import uart as u
from devices.lpc.uart import Uart16550


class Recorder:
    def __init__(self):
        self.irqs = []
        self.tx = bytearray()
        self.rx_ready = 0
        self.configs = 0

    def make(self):
        return Uart16550(
            on_irq=self.irqs.append,
            on_tx=self.tx.extend,
            on_rx_ready=self._rx_ready,
            on_config=self._config,
        )

    def _rx_ready(self):
        self.rx_ready += 1

    def _config(self):
        self.configs += 1


@pytest.fixture
def rec():
    return Recorder()


@pytest.fixture
def uart(rec):
    return rec.make()


def test_power_on_values(uart):
    assert uart.io_read(u.IER_DLM) == 0
    assert uart.io_read(u.IIR_FCR) == u.IIR_NO_INT
    assert uart.io_read(u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert uart.io_read(u.MSR) == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS
    assert uart.io_read(u.MCR) == 0
    assert uart.irq_level is False


def test_scratch_register(uart):
    for v in (0x00, 0x55, 0xAA, 0xFF):
        uart.io_write(u.SCR, v)
        assert uart.io_read(u.SCR) == v


def test_ier_probe_keeps_only_low_nibble(uart):
    uart.io_write(u.IER_DLM, 0)
    assert uart.io_read(u.IER_DLM) & 0x0F == 0
    uart.io_write(u.IER_DLM, 0x0F)
    assert uart.io_read(u.IER_DLM) & 0x0F == 0x0F
    uart.io_write(u.IER_DLM, 0xFF)  # the XScale UUE probe must read back clear
    assert uart.io_read(u.IER_DLM) == 0x0F


def test_loopback_msr_probe(uart):
    uart.io_write(u.MCR, u.MCR_LOOP | u.MCR_OUT2 | u.MCR_RTS)
    assert uart.io_read(u.MSR) & 0xF0 == 0x90  # DCD (from OUT2) | CTS (from RTS)
    uart.io_write(u.MCR, u.MCR_LOOP | 0x0F)
    assert uart.io_read(u.MSR) & 0xF0 == 0xF0
    uart.io_write(u.MCR, 0)
    assert uart.io_read(u.MSR) & 0xF0 == u.MSR_DCD | u.MSR_DSR | u.MSR_CTS


def linux_autoconfig(uart) -> str:
    """The register dance of drivers/tty/serial/8250 autoconfig(), condensed."""
    save_ier = uart.io_read(u.IER_DLM)
    uart.io_write(u.IER_DLM, 0)
    s2 = uart.io_read(u.IER_DLM) & 0x0F
    uart.io_write(u.IER_DLM, 0x0F)
    s3 = uart.io_read(u.IER_DLM) & 0x0F
    uart.io_write(u.IER_DLM, save_ier)
    if s2 != 0 or s3 != 0x0F:
        return "none"
    save_mcr = uart.io_read(u.MCR)
    uart.io_write(u.MCR, u.MCR_LOOP | 0x0A)
    status = uart.io_read(u.MSR) & 0xF0
    uart.io_write(u.MCR, save_mcr)
    if status != 0x90:
        return "none"
    uart.io_write(u.LCR, 0xBF)
    uart.io_write(u.LCR, 0)
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    kind = uart.io_read(u.IIR_FCR) >> 6
    if kind != 3:
        return {0: "8250/16450", 1: "unknown", 2: "16550"}[kind]
    # 16550A path: EFR probes at LCR 0xBF / 0x80 must read non-zero IIR.
    uart.io_write(u.LCR, 0xBF)
    if uart.io_read(u.IIR_FCR) == 0:
        return "16650"
    uart.io_write(u.LCR, 0)
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE | 0x20)  # 16750 64-byte FIFO bit
    if uart.io_read(u.IIR_FCR) >> 5 == 7:
        return "16750"
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    return "16550A"


def test_linux_autoconfig_finds_16550a(uart):
    assert linux_autoconfig(uart) == "16550A"


def test_fifo_enabled_bits_in_iir(uart):
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    assert uart.io_read(u.IIR_FCR) & 0xC0 == 0xC0
    uart.io_write(u.IIR_FCR, 0)
    assert uart.io_read(u.IIR_FCR) & 0xC0 == 0


def test_thre_interrupt_raised_by_enabling_and_cleared_by_iir_read(uart, rec):
    uart.io_write(u.MCR, u.MCR_OUT2)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    assert uart.irq_level is True
    assert rec.irqs == [True]
    assert uart.io_read(u.IIR_FCR) == u.IIR_THRI
    assert uart.irq_level is False
    assert uart.io_read(u.IIR_FCR) == u.IIR_NO_INT
    assert rec.irqs == [True, False]


def test_thre_reasserted_after_thr_write(uart, rec):
    uart.io_write(u.MCR, u.MCR_OUT2)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    uart.io_read(u.IIR_FCR)
    uart.io_write(u.RBR_THR_DLL, ord("A"))
    assert bytes(rec.tx) == b"A"
    assert uart.io_read(u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
    assert uart.irq_level is True
    assert uart.io_read(u.IIR_FCR) == u.IIR_THRI


def test_linux_thre_startup_test(uart):
    """serial8250_do_startup: THRE must re-assert when ETBEI is toggled."""
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    iir1 = uart.io_read(u.IIR_FCR)
    uart.io_write(u.IER_DLM, 0)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    iir = uart.io_read(u.IIR_FCR)
    uart.io_write(u.IER_DLM, 0)
    assert iir1 & u.IIR_NO_INT == 0
    assert iir & u.IIR_NO_INT == 0  # otherwise Linux flags UART_BUG_THRE


def test_irq_callback_only_on_change(uart, rec):
    uart.io_write(u.MCR, u.MCR_OUT2)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    uart.io_write(u.IER_DLM, u.IER_ETBEI | u.IER_ERBFI)
    uart.io_write(u.SCR, 1)
    uart.io_read(u.LSR)
    assert rec.irqs == [True]


def test_out2_gates_irq_output(uart, rec):
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    assert uart.io_read(u.IIR_FCR) == u.IIR_THRI  # pending, but the line stays low
    assert uart.irq_level is False
    uart.io_write(u.IER_DLM, 0)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    uart.io_write(u.MCR, u.MCR_OUT2)
    assert uart.irq_level is True
    uart.io_write(u.MCR, 0)
    assert uart.irq_level is False
    assert rec.irqs == [True, False]


def test_divisor_latch(uart, rec):
    uart.io_write(u.LCR, u.LCR_DLAB | 0x03)
    uart.io_write(u.RBR_THR_DLL, 0x01)
    uart.io_write(u.IER_DLM, 0x02)
    assert uart.io_read(u.RBR_THR_DLL) == 0x01
    assert uart.io_read(u.IER_DLM) == 0x02
    assert rec.tx == b""
    assert uart.ier == 0
    uart.io_write(u.LCR, 0x03)
    assert uart.io_read(u.IER_DLM) == 0
    uart.io_write(u.RBR_THR_DLL, ord("z"))
    assert bytes(rec.tx) == b"z"
    assert (uart.dll, uart.dlm) == (1, 2)


def test_rx_without_fifo_holds_one_byte(uart, rec):
    uart.io_write(u.MCR, u.MCR_OUT2)
    uart.io_write(u.IER_DLM, u.IER_ERBFI)
    assert uart.receive(b"xy") == 1
    assert uart.io_read(u.LSR) & u.LSR_DR
    assert uart.io_read(u.IIR_FCR) == u.IIR_RDI
    assert uart.irq_level is True
    assert uart.io_read(u.RBR_THR_DLL) == ord("x")
    assert rec.rx_ready == 1
    assert not uart.io_read(u.LSR) & u.LSR_DR
    assert uart.irq_level is False


def test_rx_fifo_trigger_level_and_timeout(uart):
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE | 0x80)  # trigger at 8
    uart.io_write(u.IER_DLM, u.IER_ERBFI)
    assert uart.receive(b"abc") == 3
    assert uart.io_read(u.IIR_FCR) == 0xC0 | u.IIR_CTI  # below trigger: timeout
    assert uart.receive(b"defgh") == 5
    assert uart.io_read(u.IIR_FCR) == 0xC0 | u.IIR_RDI
    assert uart.receive(b"0123456789") == 8  # only 16 fit
    assert uart.rx_space == 0
    got = bytearray()
    while uart.io_read(u.LSR) & u.LSR_DR:
        got.append(uart.io_read(u.RBR_THR_DLL))
    assert bytes(got) == b"abcdefgh01234567"
    assert uart.io_read(u.IIR_FCR) == 0xC0 | u.IIR_NO_INT


def test_fcr_clears_rx_fifo(uart):
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    uart.receive(b"abc")
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert not uart.io_read(u.LSR) & u.LSR_DR


def test_fifo_mode_change_empties_fifos(uart):
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    uart.receive(b"abc")
    uart.io_write(u.IIR_FCR, 0)
    assert not uart.io_read(u.LSR) & u.LSR_DR
    assert uart.rx_space == 1


def test_loopback_feeds_tx_to_rx_and_keeps_line_input_out(uart, rec):
    uart.io_write(u.MCR, u.MCR_LOOP)
    assert uart.receive(b"q") == 0
    uart.io_write(u.RBR_THR_DLL, 0x5A)
    assert rec.tx == b""
    assert uart.io_read(u.RBR_THR_DLL) == 0x5A
    before = rec.rx_ready
    uart.io_write(u.MCR, 0)
    assert rec.rx_ready == before + 1  # line input may flow again
    assert uart.receive(b"q") == 1


def test_overrun_without_fifo(uart):
    uart.io_write(u.MCR, u.MCR_LOOP)
    uart.io_write(u.IER_DLM, u.IER_ELSI | u.IER_ERBFI)
    uart.io_write(u.RBR_THR_DLL, 1)
    uart.io_write(u.RBR_THR_DLL, 2)
    assert uart.io_read(u.IIR_FCR) == u.IIR_RLSI  # line status beats data ready
    lsr = uart.io_read(u.LSR)
    assert lsr & u.LSR_OE and lsr & u.LSR_DR
    assert not uart.io_read(u.LSR) & u.LSR_OE  # cleared by the read
    assert uart.io_read(u.IIR_FCR) == u.IIR_RDI
    assert uart.io_read(u.RBR_THR_DLL) == 2  # the new byte overwrote RBR
    assert uart.stats["overruns"] == 1


def test_overrun_with_fifo_keeps_fifo(uart):
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    uart.io_write(u.MCR, u.MCR_LOOP)
    for i in range(17):
        uart.io_write(u.RBR_THR_DLL, i)
    assert uart.io_read(u.LSR) & u.LSR_OE
    got = [uart.io_read(u.RBR_THR_DLL) for _ in range(16)]
    assert got == list(range(16))


def test_modem_status_interrupt_and_deltas(uart):
    uart.io_write(u.IER_DLM, u.IER_EDSSI)
    uart.io_write(u.MCR, u.MCR_LOOP | u.MCR_OUT2)  # DSR and CTS drop
    assert uart.io_read(u.IIR_FCR) == u.IIR_MSI
    msr = uart.io_read(u.MSR)
    assert msr & (u.MSR_DDSR | u.MSR_DCTS) == u.MSR_DDSR | u.MSR_DCTS
    assert not msr & u.MSR_DDCD  # DCD follows OUT2: unchanged
    assert uart.io_read(u.MSR) & u.MSR_DELTAS == 0
    assert uart.io_read(u.IIR_FCR) == u.IIR_NO_INT
    uart.io_write(u.MCR, u.MCR_LOOP | u.MCR_OUT1)
    uart.io_write(u.MCR, u.MCR_LOOP)  # RI trailing edge
    assert uart.io_read(u.MSR) & u.MSR_TERI


def test_iir_priority_order(uart):
    uart.io_write(u.IER_DLM, 0x0F)
    uart.io_write(u.MCR, u.MCR_LOOP | u.MCR_DTR)  # modem delta pending
    uart.io_write(u.RBR_THR_DLL, 1)
    uart.io_write(u.RBR_THR_DLL, 2)  # overrun: line status
    assert uart.io_read(u.IIR_FCR) == u.IIR_RLSI
    uart.io_read(u.LSR)
    assert uart.io_read(u.IIR_FCR) == u.IIR_RDI
    uart.io_read(u.RBR_THR_DLL)
    assert uart.io_read(u.IIR_FCR) == u.IIR_THRI
    assert uart.io_read(u.IIR_FCR) == u.IIR_MSI
    uart.io_read(u.MSR)
    assert uart.io_read(u.IIR_FCR) == u.IIR_NO_INT


def test_tx_backpressure(uart, rec):
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    uart.io_read(u.IIR_FCR)
    uart.pause_tx()
    uart.io_write(u.RBR_THR_DLL, ord("a"))
    uart.io_write(u.RBR_THR_DLL, ord("b"))
    assert rec.tx == b""
    assert not uart.io_read(u.LSR) & (u.LSR_THRE | u.LSR_TEMT)
    assert uart.io_read(u.IIR_FCR) & 0x0F == u.IIR_NO_INT
    uart.resume_tx()
    assert bytes(rec.tx) == b"ab"
    assert uart.io_read(u.LSR) & u.LSR_THRE
    assert uart.io_read(u.IIR_FCR) & 0x0F == u.IIR_THRI


def test_config_callback_on_config_not_data(uart, rec):
    uart.io_write(u.RBR_THR_DLL, 1)
    uart.io_read(u.LSR)
    assert rec.configs == 0
    uart.io_write(u.IER_DLM, 1)
    uart.io_write(u.LCR, 3)
    assert rec.configs == 2


def test_save_restore_round_trip(uart, rec):
    uart.io_write(u.LCR, u.LCR_DLAB)
    uart.io_write(u.RBR_THR_DLL, 0x30)
    uart.io_write(u.LCR, 0x03)
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE | 0x40)
    uart.io_write(u.MCR, u.MCR_OUT2 | u.MCR_DTR)
    uart.io_write(u.SCR, 0x77)
    uart.io_write(u.IER_DLM, u.IER_ERBFI)
    uart.receive(b"hi")
    assert uart.irq_level
    state = uart.save()

    rec2 = Recorder()
    other = rec2.make()
    other.restore(state)
    assert rec2.irqs == [True]  # the line is re-asserted
    assert other.save() == state
    assert other.io_read(u.SCR) == 0x77
    assert other.io_read(u.IIR_FCR) == 0xC0 | u.IIR_CTI
    assert other.io_read(u.RBR_THR_DLL) == ord("h")
    other.io_write(u.LCR, 0x83)
    assert other.io_read(u.RBR_THR_DLL) == 0x30


def test_reset(uart):
    uart.io_write(u.IER_DLM, 0x0F)
    uart.io_write(u.MCR, u.MCR_OUT2)
    uart.io_write(u.IIR_FCR, u.FCR_ENABLE)
    uart.receive(b"abc")
    uart.reset()
    assert uart.irq_level is False
    assert uart.io_read(u.IER_DLM) == 0
    assert uart.io_read(u.IIR_FCR) == u.IIR_NO_INT
    assert uart.io_read(u.LSR) == u.LSR_THRE | u.LSR_TEMT


def test_restore_re_arms_thre_when_the_guest_waits_for_it(uart, rec):
    # A checkpoint taken after the guest acknowledged THRE (IIR read) but
    # before its next THR write: restored, the guest must still get a THRE
    # interrupt or its output stops for good (kill -9 of the lpc in the lab).
    uart.io_write(u.MCR, u.MCR_OUT2)
    uart.io_write(u.IER_DLM, u.IER_ETBEI)
    assert uart.io_read(u.IIR_FCR) & 0x0F == u.IIR_THRI   # acknowledged
    state = uart.save()
    assert state["thre_pending"] is False
    rec2 = Recorder()
    other = rec2.make()
    other.restore(state)
    assert rec2.irqs == [True]
    assert other.io_read(u.IIR_FCR) & 0x0F == u.IIR_THRI
