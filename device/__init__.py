"""The on-device runtime: what gets flashed to a phone or board. Never imports torch."""

from edgeftl.device.ort import install_torch_free_import

install_torch_free_import()
