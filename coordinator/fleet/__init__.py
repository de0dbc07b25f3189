"""The fleet: package the device runtime, flash it to boards over SSH, and see the devices on a broker."""
