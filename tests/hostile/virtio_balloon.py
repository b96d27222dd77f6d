"""The real virtio-balloon model, compromised (tests/hostile/attacks.py)."""

from devices.virtio_balloon.model import VirtioBalloonDevice
from tests.hostile.attacks import Attack


class HostileBalloon(VirtioBalloonDevice):
    async def start(self) -> None:
        await super().start()
        self.attack = Attack(self, self.transport.msix_vectors, {self.intx_gsi})
        self.attack.start()

    def stats(self) -> dict:
        out = super().stats()
        if hasattr(self, "attack"):
            out["hostile"] = self.attack.report()
        return out


DEVICE_MODEL = HostileBalloon
