"""The real virtio-blk model, compromised (tests/hostile/attacks.py)."""

from devices.virtio_blk.model import VirtioBlkDevice
from tests.hostile.attacks import Attack


class HostileBlk(VirtioBlkDevice):
    async def start(self) -> None:
        await super().start()
        self.attack = Attack(self, self.transport.msix_vectors, {self.intx_gsi})
        self.attack.start()

    def stats(self) -> dict:
        out = super().stats()
        if hasattr(self, "attack"):
            out["hostile"] = self.attack.report()
        return out


DEVICE_MODEL = HostileBlk
