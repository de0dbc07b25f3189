"""Transport security of an MQTT connection: TLS (a private CA, client certificates for mTLS),
a username with a password read from a file, and one clear line when the broker says no.

Passwords never travel in URLs (they show in `ps`, shell history and error lines): a URL that
holds one is refused, and nothing here prints the password. Plain MQTT is allowed to a loopback
broker only, unless `insecure` says the network is trusted some other way.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

MAX_PASSWORD_BYTES = 4096
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class TransportSecurity:
    """How a connection authenticates; one field per CLI flag (device/cli/common.py)."""

    ca_file: Path | None = None  # the CA that signed the broker's certificate (default: the system's)
    cert: Path | None = None  # this client's certificate (mTLS), with `key`
    key: Path | None = None
    username: str | None = None
    password_file: Path | None = None  # the first line is the password
    insecure: bool = False  # allow plain MQTT to a host that is not loopback

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert", "key", "password_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name.replace('_', '-')} {str(path)!r} is not a file")
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert and --key go together (the client certificate and its private key)")
        if self.password_file is not None and self.username is None:
            raise ValueError("--password-file needs --username")

    @property
    def wants_tls(self) -> bool:
        return self.ca_file is not None or self.cert is not None

    def password(self) -> str | None:
        """The password file's first line (never logged)."""
        if self.password_file is None:
            return None
        data = Path(self.password_file).read_bytes()[:MAX_PASSWORD_BYTES + 1]
        lines = data.decode("utf-8", errors="strict").splitlines() if data else []
        if not lines or not lines[0] or len(data) > MAX_PASSWORD_BYTES:
            raise ValueError(f"--password-file {str(self.password_file)!r} must hold the password on its first "
                             f"line (at most {MAX_PASSWORD_BYTES} bytes)")
        return lines[0]

    def apply(self, client: mqtt.Client, host: str, tls: bool, username: str | None) -> None:
        """Configure `client` for a broker at `host` (`tls` from the URL scheme).

        Raises:
            ValueError: TLS files without an mqtts:// URL, or plain MQTT to a non-loopback host.
        """
        self.check(host, tls)
        if tls:
            client.tls_set(ca_certs=_str(self.ca_file), certfile=_str(self.cert), keyfile=_str(self.key),
                           cert_reqs=ssl.CERT_REQUIRED)
        user = self.username or username
        if user is not None:
            client.username_pw_set(user, self.password())

    def check(self, host: str, tls: bool) -> None:
        """Refuse what apply() would for `host` (every node of a cluster is checked before connecting).

        Raises:
            ValueError: TLS files without an mqtts:// URL, or plain MQTT to a non-loopback host.
        """
        if self.wants_tls and not tls:
            raise ValueError("--ca-file, --cert and --key need a TLS broker URL: mqtts://host[:port]")
        if not tls and not self.insecure and not is_loopback(host):
            raise ValueError(f"broker host {host!r} is not loopback: use mqtts://{host} (TLS), or pass --insecure "
                             "to send credentials and updates in the clear")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(reason: object) -> str:
    """One line for a broker's refusal (a CONNACK reason code) or a failed TLS handshake."""
    text = str(reason)
    if isinstance(reason, ssl.SSLError):
        detail = getattr(reason, "verify_message", None) or getattr(reason, "reason", None) or text
        return f"TLS failure: {detail} (check --ca-file, the broker's certificate name, and --cert/--key)"
    lowered = text.lower()
    if "user name or password" in lowered or "bad username" in lowered:
        return "bad credentials: the broker refused this username/password (check --username, --password-file)"
    if "not authori" in lowered:
        return "not authorised: the broker refused these credentials (check --username and --password-file)"
    return f"broker refused the connection: {text}"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
