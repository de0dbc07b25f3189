"""The device platforms and Pythons `edgeftl package` builds for, and how pip names them.

One home for these names: `edgeftl package` resolves wheels with the pip tags, `edgeftl flash`
checks a target's `platform.machine()` against `machine` before sending anything.

linux-armv7l (32-bit Raspberry Pi OS) is accepted as a name so that packaging for it fails the
honest way: pip finds no armv7l wheel of numpy or onnxruntime on PyPI, and the user is told which.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    """A device platform: what `platform.machine()` says there and the wheel tags pip may take."""

    name: str
    machine: str
    pip_tags: tuple[str, ...]  # every tag pip may take: pip does not widen manylinux_2_28 to older glibcs


# Wheels for glibc 2.17-2.28: a target needs glibc >= 2.28 (Debian 10+, Ubuntu 20.04+, Raspberry Pi
# OS bullseye+, JetPack 5+); stock onnxruntime 1.32's Linux wheels are manylinux_2_28 themselves.
GLIBC = (2, 28)


def _manylinux(arch: str) -> tuple[str, ...]:
    """manylinux_2_28 down to 2_17 and its legacy name manylinux2014 (pip widens that one to 2010 and 1)."""
    return (*(f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC[1], 16, -1)), f"manylinux2014_{arch}")


PLATFORMS: dict[str, Platform] = {
    "linux-x86_64": Platform("linux-x86_64", "x86_64", _manylinux("x86_64")),
    "linux-aarch64": Platform("linux-aarch64", "aarch64", _manylinux("aarch64")),
    # piwheels publishes plain linux_armv7l wheels; PyPI has none of the runtime's native ones.
    "linux-armv7l": Platform("linux-armv7l", "armv7l", (*_manylinux("armv7l"), "linux_armv7l")),
}
# The platforms PyPI has a wheel of every device requirement for (tests/test_package.py packages both).
SUPPORTED = ("linux-x86_64", "linux-aarch64")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
DEFAULT_PYTHON = "3.11"


def check_platform(name: str) -> Platform:
    """The Platform called `name`.

    Raises:
        ValueError: an unknown name, with the accepted ones.
    """
    if name not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; accepted: {', '.join(PLATFORMS)}")
    return PLATFORMS[name]


def check_python(version: str) -> str:
    """`version` ("3.11") if edgeftl's device runtime supports it.

    Raises:
        ValueError: a Python outside 3.10-3.13 (or not X.Y), with the accepted ones.
    """
    if version not in PYTHONS:
        raise ValueError(f"Python {version!r} is not supported on devices; accepted: {', '.join(PYTHONS)} "
                         "(CPython X.Y)")
    return version
