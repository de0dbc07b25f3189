"""Frames: how one message travels as MQTT payloads, chunked on T/_c/i when it is large.

`Framer` is the link's chunker and reassembler: `frames()` cuts a payload into the MQTT publishes
that carry it (with the retained-message bookkeeping of docs/PROTOCOL.md section 5), `receive()`
takes frames back and returns each payload once, verified. No sockets, no threads of its own:
the link calls it under its lock.
"""

from __future__ import annotations

import uuid

from edgeftl.device.protocol import chunks
from edgeftl.device.protocol.topics import chunk_filter, chunk_topic, split_chunk_topic, validate_topic

Frame = tuple[str, bytes]  # (MQTT topic, MQTT payload)


class Framer:
    """Chunking and reassembly for one client.

    Args:
        max_chunk: the largest MQTT payload sent; larger payloads are chunked.
        max_message_bytes: the largest payload accepted; a chunked message declaring more is
            refused at its first chunk, before anything is buffered.
    """

    def __init__(self, max_chunk: int, max_message_bytes: int) -> None:
        if max_chunk < chunks.MIN_CHUNK or max_message_bytes < max_chunk:
            raise ValueError(f"need {chunks.MIN_CHUNK} <= max_chunk ({max_chunk}) <= max_message_bytes "
                             f"({max_message_bytes})")
        self.max_chunk, self.max_message_bytes = max_chunk, max_message_bytes
        self.reassembler = chunks.Reassembler(max_message_bytes)
        self._retained_chunks: dict[str, int] = {}  # topic -> chunks of our last retained publish

    def frames(self, topic: str, payload: bytes, retain: bool) -> list[Frame]:
        """The MQTT publishes that carry `payload` on `topic`.

        A retained payload is framed so that exactly one retained message per topic can be
        completed by a late subscriber: a chunked one first clears the plain topic; an unchunked
        one clears chunk 0, without which an older chunked message can never complete; chunk
        indices left from our own earlier, longer message are cleared too.
        """
        validate_topic(topic)
        if split_chunk_topic(topic):
            raise ValueError(f"topic {topic!r} ends in a chunk sub-topic (.../_c/N), which is reserved")
        if not payload or len(payload) > self.max_message_bytes:
            raise ValueError(f"payload must be 1..{self.max_message_bytes} bytes, got {len(payload)}")
        if len(payload) <= self.max_chunk:
            frames, count = [(topic, payload)], 0
        else:
            parts = chunks.split(payload, self.max_chunk, uuid.uuid4().hex)
            frames, count = [(chunk_topic(topic, i), c) for i, c in enumerate(parts)], len(parts)
        if retain:
            previous = self._retained_chunks.get(topic, 0)
            self._retained_chunks[topic] = count
            frames = [(topic, b""), *frames] if count else [*frames, (chunk_topic(topic, 0), b"")]
            frames += [(chunk_topic(topic, i), b"") for i in range(max(count, 1), previous)]
        return frames

    def receive(self, topic: str, frame: bytes) -> Frame | None:
        """(message topic, payload) once a frame completes a payload; None for a chunk that does
        not complete one yet, or for an empty frame (a retained-message deletion).

        Raises:
            chunks.WireError: a bad or oversized chunk, or a reassembled payload failing its hash.
        """
        if not frame:
            return None
        parsed = split_chunk_topic(topic)
        if parsed is None:
            return topic, frame
        payload = self.reassembler.add(parsed[0], frame)
        return None if payload is None else (parsed[0], payload)

    @staticmethod
    def filters(topic_filter: str) -> list[str]:
        """The MQTT filters that catch messages matching `topic_filter` and their chunks."""
        extra = chunk_filter(topic_filter)
        return [topic_filter] + ([extra] if extra else [])

    def stats(self) -> dict[str, int]:
        chunks = {f"chunks_{k}": v for k, v in self.reassembler.stats.items()}
        return {**chunks, "chunks_pending": self.reassembler.pending}
