"""Write docs/conformance/vectors.json: protocol test vectors another implementation can run.

Every vector is made by the reference code (device/protocol), so the file says what it does:
messages as hex with their decoded form, chunked messages, global deltas applied bit for bit,
every codec (tools/conformance_cases.py), refusals with their reasons
(tools/conformance_refusals.py), and signed messages (tools/conformance_signed.py).
docs/conformance/README.md says how to use them; tests/test_conformance.py (signed cases:
tests/test_signatures.py) checks them in both directions. Deterministic: running it again
gives the same bytes (`--check` says whether the committed file is current).

    python tools/make_conformance.py          # rewrite the file
    python tools/make_conformance.py --check  # exit 1 if it differs from what the code makes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is not a package
from edgeftl.device.protocol import wire

import conformance_cases as cases
from conformance_refusals import refusals
from conformance_signed import signed_cases

OUT = Path(__file__).resolve().parent.parent / "docs" / "conformance" / "vectors.json"


def vectors() -> dict:
    return {
        "about": "edgeftl protocol format 1 conformance vectors, made by tools/make_conformance.py from the "
                 "reference code; docs/conformance/README.md says how to run them, docs/PROTOCOL.md is the spec.",
        "format": wire.FORMAT_VERSION, "prefix": cases.PREFIX, "max_bytes": cases.MAX_BYTES,
        "bundle": cases.manifest_case(), "messages": cases.message_cases(), "status_text": cases.status_text_cases(),
        "chunked": cases.chunk_cases(), "deltas": cases.delta_cases(), "codecs": cases.codec_cases(),
        "refusals": refusals(),
        "signed": signed_cases(),
    }


def render() -> str:
    """The vectors as JSON with one case per line, so that a changed case is a one-line diff."""
    lines = []
    for key, value in vectors().items():
        if isinstance(value, list):
            cases = ",\n".join(f"  {json.dumps(case)}" for case in value)
            lines.append(f' "{key}": [\n{cases}\n ]')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        print(f"{args.out}: {'up to date' if current == text else 'differs from what the code makes'}")
        return 0 if current == text else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
