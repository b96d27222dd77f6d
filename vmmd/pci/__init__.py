"""vmmd's PCI bus: configuration mechanism #1, the host bridge, BAR routing,
MSI-X and INTx (docs/architecture.md, "PCI and virtio")."""
