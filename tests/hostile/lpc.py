"""The real lpc model, compromised (tests/hostile/attacks.py): it owns the
reset ports and COM1/COM2 lines, but the guest wrote no reset command and
no console is on vmmd's stdio, so its reset and quit requests are refused."""

from devices.lpc.model import LpcDevice
from tests.hostile.attacks import Attack


class HostileLpc(LpcDevice):
    async def start(self) -> None:
        await super().start()
        self.attack = Attack(self, 0, {3, 4, 8})
        self.attack.start()

    def stats(self) -> dict:
        out = super().stats()
        if hasattr(self, "attack"):
            out["hostile"] = self.attack.report()
        return out


DEVICE_MODEL = HostileLpc
