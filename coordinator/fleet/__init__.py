"""The fleet: package the device runtime per platform, flash it to boards over SSH, and see the devices on a broker."""
