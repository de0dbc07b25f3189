"""Broker URLs: one broker, or the nodes of a broker cluster to fail over between.

`--broker` takes one URL or a comma-separated list (`mqtt://a:1883,mqtt://b:1883,mqtt://c:1883`):
the nodes of one clustered broker (NATS with JetStream, docs/BROKERS.md), which share sessions and
retained messages, so a client may reconnect to any of them. A `BrokerRing` says which node a client
tries: each client starts at a node chosen from a hash of its client id (a fleet given the same list
spreads over the nodes), and every attempt after a failed one or a lost connection goes to the next.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = {"mqtt": (1883, False, "3.1.1"), "mqtts": (8883, True, "3.1.1"),
           "mqtt5": (1883, False, "5"), "mqtts5": (8883, True, "5")}
MAX_BROKERS = 16
ACCEPTED = "mqtt://host[:port] (MQTT 3.1.1), mqtt5://host[:port] (MQTT 5), mqtts:// and mqtts5:// (TLS)"


def parse_url(url: str) -> tuple[str, int, bool, str, str | None]:
    """(host, port, tls, version, username) of mqtt[s][5]://[user@]host[:port].

    Raises:
        ValueError: naming the URL and the accepted forms; a URL holding a password is refused
            without repeating it.
    """
    parts = urlsplit(url)
    if parts.password is not None:
        raise ValueError("the broker URL holds a password, which ps and logs would show: remove it and pass "
                         "--username with --password-file FILE instead")
    if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"bad broker URL {url!r}; accepted: {ACCEPTED}")
    default_port, tls, version = SCHEMES[parts.scheme]
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"bad port in broker URL {url!r}; accepted: {ACCEPTED}") from None
    user = unquote(parts.username) if parts.username else None
    return parts.hostname, port, tls, version, user


@dataclass(frozen=True)
class Broker:
    """One node: its URL as given and what parse_url read from it."""

    url: str
    host: str
    port: int
    tls: bool
    version: str
    username: str | None


def parse_brokers(text: str) -> list[Broker]:
    """The nodes of `text`: one URL, or up to MAX_BROKERS comma-separated URLs of one cluster.

    Raises:
        ValueError: an empty entry, a bad URL, the same node twice, or nodes that differ in scheme
            (TLS, MQTT version) or username (one client connects to any of them with one setting).
    """
    urls = [part.strip() for part in str(text).split(",")]
    if not all(urls):
        raise ValueError(f"bad broker list {text!r}: an empty entry; give URLs separated by commas, "
                         "e.g. mqtt://a:1883,mqtt://b:1883")
    if len(urls) > MAX_BROKERS:
        raise ValueError(f"bad broker list: {len(urls)} URLs, at most {MAX_BROKERS} are accepted")
    brokers = [Broker(url, *parse_url(url)) for url in urls]
    nodes = [(b.host.lower(), b.port) for b in brokers]
    twice = sorted({f"{h}:{p}" for h, p in nodes if nodes.count((h, p)) > 1})
    if twice:
        raise ValueError(f"bad broker list {text!r}: {', '.join(twice)} given more than once")
    kinds = {(b.tls, b.version, b.username) for b in brokers}
    if len(kinds) > 1:
        raise ValueError(f"bad broker list {text!r}: the nodes of one cluster need the same scheme (mqtt, mqtts, "
                         "mqtt5, mqtts5) and the same username")
    return brokers


class BrokerRing:
    """Which node of `brokers` a client tries: a start chosen by its client id, then round robin.

    Args:
        brokers: from parse_brokers.
        client_id: spreads clients over the nodes (CRC-32 of the id, modulo the node count).
    """

    def __init__(self, brokers: list[Broker], client_id: str) -> None:
        if not brokers:
            raise ValueError("a broker ring needs at least one broker")
        self.brokers = list(brokers)
        self._index = zlib.crc32(client_id.encode()) % len(brokers)

    @property
    def current(self) -> Broker:
        return self.brokers[self._index]

    def advance(self) -> Broker:
        """Move to the next node (the same one when there is only one) and return it."""
        self._index = (self._index + 1) % len(self.brokers)
        return self.current

    def __len__(self) -> int:
        return len(self.brokers)
