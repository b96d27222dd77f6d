"""Sans-I/O model of one 16550A UART (PC16550D register semantics).

The model has no clock. Consequences, chosen so that Linux's 8250 driver
sees a well-behaved chip:

- Transmission is instantaneous: a THR write goes to ``on_tx`` at once, so
  THR and the shift register are empty right after the write (LSR shows
  THRE|TEMT). ``pause_tx()``/``resume_tx()`` exist so a backend can apply
  backpressure later: while paused, written bytes stay in the TX FIFO and
  LSR/IIR show it.
- The character-timeout indication (IIR 0x0C) is reported as soon as the
  RX FIFO holds data below the trigger level (the chip waits four character
  times; the guest cannot tell the difference, and no byte is ever stranded
  below the trigger level).
- Input never overruns: ``receive()`` takes only what fits and the caller
  keeps the rest until ``on_rx_ready`` says the guest made room. Overrun
  (LSR.OE) only happens in loopback, where the guest itself is the sender.

Wider-than-byte accesses are not handled here; the LPC model splits them
into byte accesses (as the ISA bus does).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 read as 0 on a 16550A (Linux probes this)

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA = 0x08
FCR_TRIGGER_MASK = 0xC0
TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
# A connected line outside loopback: carrier, data set ready, clear to send.
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

FIFO_SIZE = 16


def _nop(*_args) -> None:
    pass


class Uart16550:
    """One 16550A. Callbacks:

    on_irq(level)  -- the interrupt output changed (only on change)
    on_tx(data)    -- the guest transmitted bytes
    on_rx_ready()  -- the guest made room in the RX FIFO (retry receive())
    on_config()    -- guest-visible configuration changed (checkpoint)
    """

    def __init__(
        self,
        on_irq: Callable[[bool], None] = _nop,
        on_tx: Callable[[bytes], None] = _nop,
        on_rx_ready: Callable[[], None] = _nop,
        on_config: Callable[[], None] = _nop,
    ):
        self.on_irq = on_irq
        self.on_tx = on_tx
        self.on_rx_ready = on_rx_ready
        self.on_config = on_config
        self.irq_level = False
        self.tx_paused = False
        self.stats = {"tx_bytes": 0, "rx_bytes": 0, "irqs": 0, "overruns": 0}
        self._power_on()

    # --- power-on / reset -------------------------------------------------

    def _power_on(self) -> None:
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = 0x0C  # 9600 baud at 1.8432 MHz; what a PC BIOS leaves
        self.dlm = 0
        self.fifo_enabled = False
        self.fcr_bits = 0  # trigger level and DMA bit as last programmed
        self.lsr_errors = 0
        self.msr = MSR_CONNECTED
        self.thre_pending = False
        self.rx_fifo: deque[int] = deque()
        self.tx_fifo: deque[int] = deque()
        self._rx_room_made = False

    def reset(self) -> None:
        """Master reset: registers to power-on values, FIFOs emptied."""
        self._power_on()
        self._update_irq()

    # --- derived state ----------------------------------------------------

    @property
    def loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    @property
    def fifo_capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    @property
    def rx_space(self) -> int:
        """How many bytes receive() would accept now."""
        if self.loopback:
            return 0  # the serial input is disconnected in loopback
        return self.fifo_capacity - len(self.rx_fifo)

    @property
    def trigger_level(self) -> int:
        return TRIGGER_LEVELS[self.fcr_bits & FCR_TRIGGER_MASK]

    def _lsr(self) -> int:
        lsr = self.lsr_errors
        if self.rx_fifo:
            lsr |= LSR_DR
        if not self.tx_fifo:
            lsr |= LSR_THRE | LSR_TEMT
        return lsr

    def _pending_source(self) -> int:
        """Highest-priority pending, enabled interrupt as an IIR id, or NO_INT."""
        if self.ier & IER_ELSI and self.lsr_errors:
            return IIR_RLSI
        if self.ier & IER_ERBFI and self.rx_fifo:
            if not self.fifo_enabled or len(self.rx_fifo) >= self.trigger_level:
                return IIR_RDI
            return IIR_CTI
        if self.ier & IER_ETBEI and self.thre_pending:
            return IIR_THRI
        if self.ier & IER_EDSSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self, force: bool = False) -> None:
        # On a PC the UART's interrupt pin reaches the PIC only through a
        # gate driven by OUT2; in loopback the chip forces OUT2 inactive.
        level = (
            self._pending_source() != IIR_NO_INT
            and bool(self.mcr & MCR_OUT2)
            and not self.loopback
        )
        if level != self.irq_level or force:
            if level and not self.irq_level:
                self.stats["irqs"] += 1
            self.irq_level = level
            self.on_irq(level)

    # --- modem lines --------------------------------------------------------

    def _set_msr_lines(self, lines: int) -> None:
        old = self.msr
        changed = (old ^ lines) & 0xF0
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI  # trailing edge only
        self.msr = lines | (old & MSR_DELTAS) | deltas

    def _loopback_lines(self) -> int:
        # Loopback wiring: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        lines = 0
        if self.mcr & MCR_RTS:
            lines |= MSR_CTS
        if self.mcr & MCR_DTR:
            lines |= MSR_DSR
        if self.mcr & MCR_OUT1:
            lines |= MSR_RI
        if self.mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    # --- transmit -----------------------------------------------------------

    def _write_thr(self, value: int) -> None:
        self.thre_pending = False
        if len(self.tx_fifo) >= self.fifo_capacity:
            self.tx_fifo.pop()  # the chip overwrites the last slot
        self.tx_fifo.append(value)
        self._transmit()

    def _transmit(self) -> None:
        if self.tx_paused or not self.tx_fifo:
            return
        data = bytes(self.tx_fifo)
        self.tx_fifo.clear()
        if self.loopback:
            for byte in data:
                self._loop_receive(byte)
        else:
            self.stats["tx_bytes"] += len(data)
            self.on_tx(data)
        self.thre_pending = True  # THR just became empty

    def _loop_receive(self, byte: int) -> None:
        if len(self.rx_fifo) < self.fifo_capacity:
            self.rx_fifo.append(byte)
            return
        self.lsr_errors |= LSR_OE
        self.stats["overruns"] += 1
        if not self.fifo_enabled:
            # 16450 mode: the new character overwrites the holding register.
            self.rx_fifo[-1] = byte
        # FIFO mode: the character in the shift register is lost.

    def pause_tx(self) -> None:
        """Backend cannot take more output: keep bytes in the TX FIFO."""
        self.tx_paused = True

    def resume_tx(self) -> None:
        self.tx_paused = False
        self._transmit()
        self._update_irq()

    # --- receive ------------------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Push input from the line; returns how many bytes were taken."""
        n = min(len(data), self.rx_space)
        if n <= 0:
            return 0
        self.rx_fifo.extend(data[:n])
        self.stats["rx_bytes"] += n
        self._update_irq()
        return n

    # --- guest register access ----------------------------------------------

    def io_read(self, offset: int) -> int:
        freed = False
        if offset == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                value = self.dll
            elif self.rx_fifo:
                value = self.rx_fifo.popleft()
                freed = True
            else:
                value = 0
        elif offset == IER_DLM:
            value = self.dlm if self.lcr & LCR_DLAB else self.ier
        elif offset == IIR_FCR:
            source = self._pending_source()
            value = source | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
            if source == IIR_THRI:
                self.thre_pending = False  # reading IIR acknowledges THRE
        elif offset == LCR:
            value = self.lcr
        elif offset == MCR:
            value = self.mcr
        elif offset == LSR:
            value = self._lsr()
            self.lsr_errors = 0
        elif offset == MSR:
            value = self.msr
            self.msr &= ~MSR_DELTAS
        elif offset == SCR:
            value = self.scr
        else:
            raise ValueError(f"UART offset {offset} out of range 0..7")
        self._update_irq()
        if freed:
            self._rx_room_made = True
        self._notify_rx_room()
        return value

    def io_write(self, offset: int, value: int) -> None:
        value &= 0xFF
        config = True
        if offset == RBR_THR_DLL:
            if self.lcr & LCR_DLAB:
                self.dll = value
            else:
                self._write_thr(value)
                config = False
        elif offset == IER_DLM:
            if self.lcr & LCR_DLAB:
                self.dlm = value
            else:
                self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset in (LSR, MSR):
            config = False  # read-only on the PC16550D (factory test only)
        elif offset == SCR:
            self.scr = value
        else:
            raise ValueError(f"UART offset {offset} out of range 0..7")
        self._update_irq()
        if config:
            self.on_config()
        self._notify_rx_room()

    def _notify_rx_room(self) -> None:
        # Called last, once the access is complete, so on_rx_ready may
        # re-enter receive() safely.
        if self._rx_room_made:
            self._rx_room_made = False
            if self.rx_space > 0:
                self.on_rx_ready()

    def _write_ier(self, value: int) -> None:
        old = self.ier
        self.ier = value & IER_MASK
        # Enabling ETBEI while THR is empty raises THRE at once; Linux's
        # startup test (UART_BUG_THRE) relies on the re-assertion.
        if self.ier & IER_ETBEI and not old & IER_ETBEI and not self.tx_fifo:
            self.thre_pending = True

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        rx_was_full = self.rx_space == 0
        clear_rx = clear_tx = enable != self.fifo_enabled  # FCR0 change empties both
        self.fifo_enabled = enable
        if enable:  # other FCR bits are programmed only with FCR0 set
            self.fcr_bits = value & (FCR_TRIGGER_MASK | FCR_DMA)
            clear_rx = clear_rx or bool(value & FCR_CLEAR_RX)
            clear_tx = clear_tx or bool(value & FCR_CLEAR_TX)
        if clear_rx:
            self.rx_fifo.clear()
        if clear_tx and self.tx_fifo:
            self.tx_fifo.clear()
            self.thre_pending = True  # THR went from full to empty
        if rx_was_full:
            self._rx_room_made = True

    def _write_mcr(self, value: int) -> None:
        was_loop = self.loopback
        self.mcr = value & MCR_MASK
        self._set_msr_lines(self._loopback_lines() if self.loopback else MSR_CONNECTED)
        if was_loop and not self.loopback:
            self._rx_room_made = True  # serial input is connected again

    # --- save / restore (shape validated by devices/lpc/state.py) ------------

    def save(self) -> dict:
        return {
            "ier": self.ier,
            "lcr": self.lcr,
            "mcr": self.mcr,
            "scr": self.scr,
            "dll": self.dll,
            "dlm": self.dlm,
            "fifo_enabled": self.fifo_enabled,
            "fcr_bits": self.fcr_bits,
            "lsr_errors": self.lsr_errors,
            "msr": self.msr,
            "thre_pending": self.thre_pending,
            "rx_fifo": bytes(self.rx_fifo),
            "tx_fifo": bytes(self.tx_fifo),
        }

    def restore(self, state: dict) -> None:
        """Load a state that devices.lpc.state has validated; re-asserts IRQ."""
        self.ier = state["ier"]
        self.lcr = state["lcr"]
        self.mcr = state["mcr"]
        self.scr = state["scr"]
        self.dll = state["dll"]
        self.dlm = state["dlm"]
        self.fifo_enabled = state["fifo_enabled"]
        self.fcr_bits = state["fcr_bits"]
        self.lsr_errors = state["lsr_errors"]
        self.msr = state["msr"]
        self.thre_pending = state["thre_pending"]
        self.rx_fifo = deque(state["rx_fifo"])
        self.tx_fifo = deque(state["tx_fifo"])
        self._transmit()
        if self.ier & IER_ETBEI and not self.tx_fifo:
            # A state from a checkpoint may predate the guest's last IIR read:
            # re-arm THRE. A spurious THRE interrupt is harmless (drivers
            # re-check LSR); a lost one stops the guest's output for good.
            self.thre_pending = True
        # Always report: the host's line may hold a stale level.
        self._update_irq(force=True)
