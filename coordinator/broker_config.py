"""A Mosquitto 2 configuration for a secured federation (`edgeftl broker-config`, host side).

One TLS listener with the certificates of `edgeftl certs`, no anonymous clients, the password
file, persistence on, and an ACL file beside the configuration: each device (MQTT username =
device id, Mosquitto's `%u`) may write only its own update and status topics and read the task
and globals; the coordinator may write the task and globals and read every update and status.
Every topic also covers its chunk sub-topics (T/_c/i, docs/PROTOCOL.md section 3).
"""

from __future__ import annotations

from pathlib import Path

from edgeftl.coordinator.certs import COORDINATOR_USER
from edgeftl.device.files import atomic_write
from edgeftl.device.protocol.topics import CHUNK_LEVEL, Topics

REQUIRED = ("ca.crt", "broker.crt", "broker.key", "passwords")


def write_broker_config(certs: Path, port: int, out: Path, mtls: bool = False, prefix: str = "edgeftl",
                        bind: str | None = None, run_as: str | None = None) -> tuple[Path, Path]:
    """Write `out` (mosquitto.conf) and `out`.acl; returns both paths.

    Raises:
        ValueError: a certs folder without what `edgeftl certs` writes, or a bad port.
    """
    certs = Path(certs).resolve()
    missing = [name for name in REQUIRED if not (certs / name).is_file()]
    if missing:
        raise ValueError(f"{str(certs)!r} lacks {missing}; make it with `edgeftl certs --out DIR --devices ...`")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be 1..65535, got {port}")
    out = Path(out).resolve()
    acl = out.with_name(out.name + ".acl")
    data = out.with_name(out.stem + "-data")
    data.mkdir(parents=True, exist_ok=True)
    atomic_write(acl, acl_text(prefix), mode=0o644)
    atomic_write(out, config_text(certs, port, acl, data, mtls, bind, run_as), mode=0o644)
    return out, acl


def config_text(certs: Path, port: int, acl: Path, data: Path, mtls: bool, bind: str | None,
                run_as: str | None) -> str:
    listener = f"listener {port} {bind}" if bind else f"listener {port}"
    # Started as root, mosquitto switches to this user (default "mosquitto") before it reads the
    # 0600 password file and broker key: they must belong to that user.
    user = [f"user {run_as}"] if run_as else []
    return "\n".join([
        "# edgeftl federation broker (edgeftl broker-config); start: mosquitto -c THIS_FILE",
        *user,
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {certs / 'passwords'}",
        f"acl_file {acl}",
        "persistence true",
        f"persistence_location {data}/",
        "",
        listener,
        f"cafile {certs / 'ca.crt'}",
        f"certfile {certs / 'broker.crt'}",
        f"keyfile {certs / 'broker.key'}",
        "tls_version tlsv1.2",
        f"require_certificate {'true' if mtls else 'false'}",
        "",
    ])


def acl_text(prefix: str) -> str:
    topics = Topics(prefix)  # checks the prefix
    device_writes = [f"{topics.updates_filter[:-1]}%u", f"{topics.status_filter[:-1]}%u"]
    shared = [topics.task, topics.global_params, topics.global_delta]
    lines = ["# devices: MQTT username = device id (%u)"]
    lines += [f"pattern write {t}" for t in _with_chunks(device_writes)]
    lines += [f"pattern read {t}" for t in _with_chunks(shared)]
    lines += [f"pattern read {topics.status_filter[:-1]}%u"]  # its own status: a stale will is answered with its birth
    lines += ["", f"user {COORDINATOR_USER}"]
    lines += [f"topic write {t}" for t in _with_chunks(shared)]
    lines += [f"topic read {t}" for t in _with_chunks([topics.updates_filter, topics.status_filter])]
    return "\n".join(lines) + "\n"


def _with_chunks(topics: list[str]) -> list[str]:
    return [form for topic in topics for form in (topic, f"{topic}/{CHUNK_LEVEL}/+")]
