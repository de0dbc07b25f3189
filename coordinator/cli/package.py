"""`edgeftl package`: one self-contained archive (device runtime, the platform's wheels, the bundle,
a launcher and a systemd unit template) that `edgeftl flash` installs on boards of that platform.

    edgeftl package --bundle out/bundle --platform linux-aarch64 --python 3.11 --out pi.tar.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeftl.coordinator.fleet.platforms import DEFAULT_PYTHON, PYTHONS, SUPPORTED
from edgeftl.device.cli.common import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, required=True, help="the bundle folder `edgeftl build` wrote")
    p.add_argument("--platform", required=True, help=f"the devices' platform: {', '.join(SUPPORTED)} "
                   "(linux-armv7l is refused: PyPI has no armv7l wheels of numpy or onnxruntime)")
    p.add_argument("--python", default=DEFAULT_PYTHON, help=f"the devices' CPython X.Y: {', '.join(PYTHONS)} "
                   f"(default: {DEFAULT_PYTHON})")
    p.add_argument("--out", type=Path, required=True, help="the archive to write (.tar.gz)")
    p.add_argument("--wheels-cache", type=Path, default=None, help="wheel cache folder (default: $EDGEFTL_WHEELS, "
                   "else ~/.cache/edgeftl/wheels); one subfolder per platform and Python")
    p.add_argument("--offline", action="store_true",
                   help="take wheels from the cache only (pip --no-index --find-links CACHE)")


def run(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.fleet.package import PackageConfig, build_package

    try:
        config = PackageConfig(args.bundle, args.platform, args.out, args.python, args.wheels_cache, args.offline)
        result = build_package(config)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    print(result.summary())
    return 0
