"""Helpers shared by the subcommands: one-line errors, exit codes, the broker security flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeftl.device.link.security import TransportSecurity

EXIT_BAD_INPUT = 2


def fail(message: str) -> int:
    """Print one clear error line and return the bad-input exit code."""
    print(f"edgeftl: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def csv_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_security_flags(p: argparse.ArgumentParser) -> None:
    """The broker connection's TLS and credential flags (link/security.py TransportSecurity) and
    the message signing key; every command that takes --broker adds them."""
    p.add_argument("--ca-file", type=Path, default=None, help="CA certificate the broker's certificate is checked "
                   "against (mqtts://); default: the system's CAs")
    p.add_argument("--cert", type=Path, default=None, help="client certificate for mutual TLS (with --key)")
    p.add_argument("--key", type=Path, default=None, help="private key of --cert")
    p.add_argument("--username", default=None, help="MQTT username")
    p.add_argument("--password-file", type=Path, default=None,
                   help="file whose first line is the MQTT password (never put it in the URL)")
    p.add_argument("--insecure", action="store_true", help="allow plain mqtt:// to a host that is not loopback")
    p.add_argument("--signing-key", type=Path, default=None,
                   help="Ed25519 private key (PEM) this side signs its messages with (edgeftl certs writes them)")


def security_from(args: argparse.Namespace) -> TransportSecurity:
    from edgeftl.device.link.security import TransportSecurity

    return TransportSecurity(args.ca_file, args.cert, args.key, args.username, args.password_file, args.insecure)
