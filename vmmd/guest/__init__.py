"""Building the Linux test guest: `vmmd-guest build` (build.py) and its initramfs writer."""
