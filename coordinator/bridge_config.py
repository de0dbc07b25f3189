"""A Mosquitto 2 configuration for a site gateway bridging a federation to a central broker
(`edgeftl broker-config --bridge-to URL`, host side).

Devices at a site (a shop, a farm, a vehicle depot) connect to the gateway's own Mosquitto; one bridge
connection carries the federation's topics (docs/PROTOCOL.md section 3) to and from the central broker
where the coordinator is: the coordinator's task, globals and secure-aggregation stages come in, the
devices' updates, statuses (retained births and wills) and secure-aggregation stages go out. Each topic
filter ends in `#`, which covers the chunk sub-topics (T/_c/i). The bridge keeps a persistent session on
the central broker (cleansession false) and the gateway queues QoS 1 messages while the uplink is down,
so a site that loses its uplink for a while loses no update that its devices got a PUBACK for.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeftl.device.files import atomic_write
from edgeftl.device.link.brokers import parse_brokers
from edgeftl.device.protocol.topics import Topics

DOWN = ("task", "global", "secagg/down")  # central -> site
UP = ("update", "status", "secagg/up")  # site -> central
SITE_NAME = r"[A-Za-z0-9_-]{1,40}"


def write_bridge_config(central: str, site: str, port: int, out: Path, prefix: str = "edgeftl",
                        bind: str = "127.0.0.1", ca_file: Path | None = None, username: str | None = None,
                        password_file: Path | None = None) -> Path:
    """Write `out`, a gateway's mosquitto.conf: a listener for the site's devices and the bridge.

    Args:
        central: the central broker's URL, or a broker cluster's comma-separated nodes (Mosquitto tries
            them in turn: round_robin).
        site: names the bridge's client id on the central broker (edgeftl-bridge-SITE).
        port, bind: the gateway's listener for devices.
        ca_file: the CA of the central broker's certificate (mqtts:// URLs).
        username, password_file: the bridge's credentials on the central broker.

    Raises:
        ValueError: a bad URL list, site name, port or prefix, TLS files with a plain URL, or a password
            without a username.
    """
    brokers = parse_brokers(central)
    if not re.fullmatch(SITE_NAME, site):
        raise ValueError(f"bad site name {site!r}: use 1-40 characters from [A-Za-z0-9_-]")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be 1..65535, got {port}")
    tls = brokers[0].tls
    if ca_file is not None and not tls:
        raise ValueError("--ca-file needs a TLS central broker URL: mqtts://host[:port]")
    if password_file is not None and username is None:
        raise ValueError("--password-file needs --username (the bridge's user on the central broker)")
    if brokers[0].version != "3.1.1":
        raise ValueError("the bridge speaks MQTT 3.1.1 to the central broker: give mqtt:// or mqtts:// URLs")
    password = None if password_file is None else Path(password_file).read_text().splitlines()[0]
    text = bridge_text(brokers_addresses(central), site, port, bind, prefix, tls, ca_file, username, password)
    out = Path(out).resolve()
    atomic_write(out, text, mode=0o600 if password else 0o644)  # a password inside: owner only
    return out


def brokers_addresses(central: str) -> str:
    return ", ".join(f"{b.host}:{b.port}" for b in parse_brokers(central))


def bridge_text(addresses: str, site: str, port: int, bind: str, prefix: str, tls: bool, ca_file: Path | None,
                username: str | None, password: str | None) -> str:
    topics = Topics(prefix)  # checks the prefix
    loopback = bind in ("127.0.0.1", "localhost", "::1")
    lines = [
        f"# edgeftl site gateway {site!r} (edgeftl broker-config --bridge-to); start: mosquitto -c THIS_FILE",
        "per_listener_settings false",
        "allow_anonymous true" if loopback else "allow_anonymous false",
        *([] if loopback else ["# devices on the site's network: add password_file and acl_file (and TLS) here, as "
                               "edgeftl broker-config --certs writes them"]),
        "persistence false",
        "max_queued_messages 10000",
        f"listener {port} {bind}",
        "",
        f"connection edgeftl-bridge-{site}",
        f"addresses {addresses}",
        "round_robin true",
        f"remote_clientid edgeftl-bridge-{site}",
        "bridge_protocol_version mqttv311",
        "cleansession false",
        "try_private true",
        "notifications false",
        "restart_timeout 1 30",
        "keepalive_interval 30",
    ]
    if tls:
        lines.append(f"bridge_cafile {Path(ca_file).resolve()}" if ca_file else "bridge_capath /etc/ssl/certs")
    if username:
        lines.append(f"remote_username {username}")
    if password:
        lines.append(f"remote_password {password}")
    # T/# matches T itself too (MQTT 3.1.1 section 4.7.1.2): one filter per place, chunks and deltas included
    lines += [f"topic {topics.prefix}/{level}/# in 1" for level in DOWN]
    lines += [f"topic {topics.prefix}/{level}/# out 1" for level in UP]
    return "\n".join(lines) + "\n"
