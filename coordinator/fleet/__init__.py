"""Flashing a fleet from the host: package the device runtime per platform, push it to boards, see them."""
