"""Topic names of the edgeftl protocol, topic-filter matching, and chunk sub-topics."""

from __future__ import annotations

import hashlib
import re

CHUNK_LEVEL = "_c"  # chunk i of a message on topic T travels on T/_c/i
MAX_TOPIC_BYTES = 1024
_LEVEL = re.compile(r"[A-Za-z0-9_.-]+")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_topic(topic: str) -> str:
    """A concrete topic name: non-empty, no wildcards or NUL, at most 1024 UTF-8 bytes.

    Raises:
        ValueError: naming the topic and the rule it breaks.
    """
    if not isinstance(topic, str) or not topic or len(topic.encode()) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic must be a non-empty string of at most {MAX_TOPIC_BYTES} bytes, got {topic!r}")
    if "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"topic {topic!r} must not contain '+', '#' or NUL (those are for filters)")
    return topic


def validate_filter(topic_filter: str) -> str:
    """A topic filter: '+' only as a whole level, '#' only as the whole last level.

    Raises:
        ValueError: naming the filter and the rule it breaks.
    """
    if not isinstance(topic_filter, str) or not topic_filter or len(topic_filter.encode()) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic filter must be a non-empty string of at most {MAX_TOPIC_BYTES} bytes, "
                         f"got {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        bad_hash = "#" in level and (level != "#" or i != len(levels) - 1)
        if "\0" in level or ("+" in level and level != "+") or bad_hash:
            raise ValueError(f"bad topic filter {topic_filter!r}: '+' must be a whole level "
                             "and '#' the whole last level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: '+' is one level, '#' the rest (including the parent); wildcards at the
    first level do not match topics starting with '$'."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    pattern, levels = topic_filter.split("/"), topic.split("/")
    for i, want in enumerate(pattern):
        if want == "#":
            return True
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(pattern) == len(levels)


def chunk_topic(topic: str, index: int) -> str:
    return f"{topic}/{CHUNK_LEVEL}/{index}"


def split_chunk_topic(topic: str) -> tuple[str, int] | None:
    """(message topic, chunk index) for a chunk topic T/_c/i, else None."""
    head, sep, index = topic.rpartition(f"/{CHUNK_LEVEL}/")
    if not sep or not head or not index.isdigit() or "/" in index:
        return None
    return head, int(index)


def chunk_filter(topic_filter: str) -> str | None:
    """The filter that also catches the chunks of messages matching `topic_filter`
    (None when the filter ends in '#', which already does)."""
    return None if topic_filter.endswith("#") else f"{topic_filter}/{CHUNK_LEVEL}/+"


def validate_device_id(device_id: str) -> str:
    """1-64 characters from [A-Za-z0-9_.-], starting with a letter or digit.

    Raises:
        ValueError: naming the id and the accepted form.
    """
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise ValueError(f"bad device id {device_id!r}: use 1-64 characters from [A-Za-z0-9_.-], "
                         "starting with a letter or digit")
    return device_id


class Topics:
    """The topics of one federation under `prefix` (see docs/PROTOCOL.md, "Topics").

    Args:
        prefix: 1-128 characters; '/'-separated levels of [A-Za-z0-9_.-], e.g. "edgeftl/run1".
    """

    def __init__(self, prefix: str) -> None:
        if (not isinstance(prefix, str) or not 1 <= len(prefix) <= 128
                or not all(_LEVEL.fullmatch(level) for level in prefix.split("/"))
                or CHUNK_LEVEL in prefix.split("/")):
            raise ValueError(f"bad topic prefix {prefix!r}: use 1-128 characters, '/'-separated levels "
                             f"of [A-Za-z0-9_.-], none empty and none equal to {CHUNK_LEVEL!r}")
        self.prefix = prefix

    @property
    def task(self) -> str:
        return f"{self.prefix}/task"

    @property
    def global_params(self) -> str:
        return f"{self.prefix}/global"

    @property
    def global_delta(self) -> str:
        return f"{self.prefix}/global/delta"

    def update(self, device_id: str) -> str:
        return f"{self.prefix}/update/{validate_device_id(device_id)}"

    def status(self, device_id: str) -> str:
        return f"{self.prefix}/status/{validate_device_id(device_id)}"

    def secagg_up(self, device_id: str) -> str:
        """Where a device sends its secure-aggregation stages (docs/SECAGG.md)."""
        return f"{self.prefix}/secagg/up/{validate_device_id(device_id)}"

    def secagg_down(self, device_id: str) -> str:
        """Where the coordinator sends one device its secure-aggregation stages."""
        return f"{self.prefix}/secagg/down/{validate_device_id(device_id)}"

    @property
    def secagg_up_filter(self) -> str:
        return f"{self.prefix}/secagg/up/+"

    @property
    def updates_filter(self) -> str:
        return f"{self.prefix}/update/+"

    @property
    def status_filter(self) -> str:
        return f"{self.prefix}/status/+"

    def parse(self, topic: str) -> tuple[str, str | None] | None:
        """What arrives on `topic` under this prefix: (place, device id or None), place being
        task, global, delta, update, status, secagg_up or secagg_down; None for any other topic."""
        fixed = {self.task: "task", self.global_params: "global", self.global_delta: "delta"}
        if topic in fixed:
            return fixed[topic], None
        for place, level in (("update", "update"), ("status", "status"), ("secagg_up", "secagg/up"),
                             ("secagg_down", "secagg/down")):
            head = f"{self.prefix}/{level}/"
            if topic.startswith(head) and DEVICE_ID.fullmatch(topic[len(head):]):
                return place, topic[len(head):]
        return None


def device_client_id(device_id: str) -> str:
    """A device's MQTT client id (its persistent session is keyed by it)."""
    return f"edgeftl-{validate_device_id(device_id)}"


def coordinator_client_id(prefix: str) -> str:
    """The coordinator's MQTT client id: 23 characters of [0-9a-z], what every MQTT 3.1.1 broker must
    accept, and stable per prefix so a restarted coordinator resumes its session."""
    return "eftlc" + hashlib.sha256(Topics(prefix).prefix.encode()).hexdigest()[:18]
