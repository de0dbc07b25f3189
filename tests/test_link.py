"""The link: typed messages between devices and the coordinator, through real Mosquitto (MQTT
3.1.1 and 5), the embedded amqtt broker and the in-process broker; and the pieces under it
(connections, framer, topics, URLs).

Most tests run on every network (`net`): the in-process broker must behave as Mosquitto does.
Hostile input is sent as raw frames through a bare connection, chunked by a `Framer`.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pytest

from edgeftl.device.link import (
    Framer,
    Incoming,
    InProcessBroker,
    InProcessConnection,
    Link,
    LinkError,
    MqttConnection,
    Refused,
    parse_url,
)
from edgeftl.device.protocol import chunks
from edgeftl.device.protocol.codecs import Encoded
from edgeftl.device.protocol.messages import (
    ErrorReply,
    Global,
    Message,
    MessageError,
    Status,
    Task,
    Update,
    encode,
    status_from_payload,
    vector_of,
)
from edgeftl.device.protocol.topics import Topics, topic_matches

from conftest import in_ci

WAIT_S = 10.0  # the most any one wait below may take; a passing test waits far less
NETS = ["in-process", "mqtt-3.1.1", "mqtt-5"]
ID_LEN = 32  # Framer's chunk message ids are uuid4().hex
SHA = "ab" * 32
BIG = 64 * 1024 * 1024  # a rogue's framer: chunks whatever it is given
T = TypeVar("T")


# ---- messages -------------------------------------------------------------------------------


def vector(size: int, seed: int = 0) -> Encoded:
    values = np.random.default_rng(seed).standard_normal(size).astype(np.float32)
    return Encoded("none", size, {"values": values})


def task(devices: tuple[str, ...] = ("dev-1",), round_index: int = 0) -> Task:
    return Task("r1", round_index, SHA, devices, 60.0, 0.01, "none", steps=1)


def full_global(round_index: int = 0, size: int = 8) -> Global:
    return Global("r1", round_index, SHA, vector(size, round_index))


def delta_global(round_index: int = 1, size: int = 8) -> Global:
    return Global("r1", round_index, SHA, vector(size, 100 + round_index), base_round=round_index - 1)


def update(device_id: str = "dev-1", size: int = 8, seq: int = 1) -> Update:
    return Update("r1", 0, SHA, device_id, 10, seq, vector(size, seq), {"loss": 0.5, "note": "ok"})


def error_reply(device_id: str = "dev-1", round_index: int = 0) -> ErrorReply:
    return ErrorReply("r1", round_index, SHA, device_id, "train_failed", "boom")


def same(a: Message, b: Message) -> bool:
    """Equal messages (dataclass == cannot compare the numpy arrays a vector holds)."""
    return type(a) is type(b) and encode(a) == encode(b)


def wire_bytes(message: Message, max_chunk: int) -> int:
    """What the link hands to the network for `message` when not retained: chunk headers included."""
    payload = encode(message)
    if len(payload) <= max_chunk:
        return len(payload)
    return sum(len(c) for c in chunks.split(payload, max_chunk, "x" * ID_LEN))


def chunk_count(message: Message, max_chunk: int) -> int:
    return math.ceil(len(encode(message)) / (max_chunk - chunks.CHUNK_FIXED_BYTES - ID_LEN))


# ---- waiting ----------------------------------------------------------------------------------


def take(link: Link, count: int, timeout_s: float = WAIT_S) -> list[Incoming | Refused]:
    """The next `count` items the link hands its reader, waiting at most `timeout_s` in all."""
    items: list[Incoming | Refused] = []
    end = time.monotonic() + timeout_s
    while len(items) < count and time.monotonic() < end:
        item = link.receive(end - time.monotonic())
        if item is not None:
            items.append(item)
    assert len(items) == count, f"expected {count} items within {timeout_s:g} s, got {items}"
    return items


def take_messages(link: Link, count: int) -> list[Message]:
    items = take(link, count)
    assert all(isinstance(item, Incoming) for item in items), items
    return [item.message for item in items]  # type: ignore[union-attr]


def poll(step: Callable[[], T | None], what: str, timeout_s: float = WAIT_S) -> T:
    """Call `step` until it returns something; fail naming `what` after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        result = step()
        if result is not None:
            return result
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


# ---- networks -------------------------------------------------------------------------------


@dataclass
class Net:
    """Where one test's links meet: a fresh in-process broker, or the session's Mosquitto under a
    fresh prefix and fresh client ids (Mosquitto keeps retained messages and sessions between tests)."""

    name: str
    url: str | None = None
    version: str | None = None
    broker: InProcessBroker | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    made: list[Link | MqttConnection | InProcessConnection] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"t{self.token}/fl"

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def connection(self, name: str, clean_start: bool = False) -> MqttConnection | InProcessConnection:
        """A bare connection (client id unique to this test, stable for `name`)."""
        client_id = f"{self.token}-{name}"
        if self.broker is not None:
            made: MqttConnection | InProcessConnection = InProcessConnection(self.broker, client_id, clean_start)
        else:
            assert self.url is not None
            made = MqttConnection(self.url, client_id, clean_start=clean_start, version=self.version)
        self.made.append(made)
        return made

    def device(self, device_id: str = "dev-1", clean_start: bool = False, **limits: int) -> Link:
        return self._keep(Link.device(self.connection(device_id, clean_start), self.prefix, device_id, **limits))

    def coordinator(self, name: str = "coord", **limits: int) -> Link:
        return self._keep(Link.coordinator(self.connection(name), self.prefix, **limits))

    def sender(self, name: str = "sender") -> Link:
        """A link that only sends (no subscriptions, no presence): plays any role's sending side."""
        return self._keep(Link(self.connection(name), self.prefix, []))

    def rogue(self, name: str = "rogue") -> Rogue:
        """A connected bare connection: sends whatever it is given, as whichever device."""
        connection = self.connection(name)
        connection.connect(WAIT_S)
        return Rogue(connection)

    def _keep(self, link: Link) -> Link:
        self.made.append(link)
        return link

    def close_all(self) -> None:
        for made in reversed(self.made):
            made.close()


@dataclass
class Rogue:
    """Raw frames through a bare connection: `send` chunks like a link (with no size limit),
    `frame` publishes one MQTT payload as it is."""

    connection: MqttConnection | InProcessConnection
    framer: Framer = field(default_factory=lambda: Framer(64 * 1024, BIG))

    def send(self, topic: str, payload: bytes) -> None:
        for frame_topic, frame in self.framer.frames(topic, payload, False):
            self.frame(frame_topic, frame)

    def frame(self, topic: str, frame: bytes) -> None:
        self.connection.send(topic, frame, 1, False)
        assert self.connection.flush(WAIT_S)


def connected(link: Link) -> Link:
    link.connect(WAIT_S)
    return link


def _net(name: str, request: pytest.FixtureRequest) -> Iterator[Net]:
    if name == "in-process":
        net = Net(name, broker=InProcessBroker())
    else:
        host, port = request.getfixturevalue("mosquitto_broker")
        net = Net(name, url=f"mqtt://{host}:{port}", version=name.removeprefix("mqtt-"))
    yield net
    net.close_all()


@pytest.fixture(params=NETS)
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    """Every network a link runs on; tests using it run once per network."""
    yield from _net(request.param, request)


@pytest.fixture
def mosquitto(request: pytest.FixtureRequest) -> Iterator[Net]:
    """Real Mosquitto over MQTT 3.1.1, for what only a real broker and socket can show."""
    yield from _net("mqtt-3.1.1", request)


# ---- typed messages end to end ----------------------------------------------------------------


def test_every_message_kind_travels_between_a_device_and_the_coordinator(net: Net) -> None:
    # Prepare: the coordinator first, so it sees the device's birth; the device follows the full global
    coordinator = connected(net.coordinator())
    device = net.device("dev-1")
    device.follow_full_global(True)
    connected(device)
    downlink = [task(), full_global(0), delta_global(1)]
    uplink = [update("dev-1"), error_reply("dev-1")]
    # Execute
    sent_down = [coordinator.send(m) for m in downlink]
    device_got = take(device, 3)
    sent_up = [device.send(m) for m in uplink]
    coordinator_got = take(coordinator, 3)
    # Assert: each message as sent, with its sender and size; the byte counters agree both ways
    assert all(isinstance(i, Incoming) for i in device_got + coordinator_got)
    assert all(same(i.message, m) for i, m in zip(device_got, downlink, strict=True))
    assert [i.device_id for i in device_got] == [None, None, None]
    assert coordinator_got[0].message == Status("dev-1", online=True)
    assert all(same(i.message, m) for i, m in zip(coordinator_got[1:], uplink, strict=True))
    assert [i.device_id for i in coordinator_got] == ["dev-1"] * 3
    assert [i.nbytes for i in device_got] == [len(encode(m)) for m in downlink]
    assert sent_up == [len(encode(m)) for m in uplink]
    assert coordinator.bytes_sent == sum(sent_down) and device.bytes_sent == sum(sent_up)
    poll(lambda: device.bytes_received == sum(sent_down) or None, "the device's byte count")
    assert coordinator.bytes_received == len(b"online") + sum(sent_up)  # the birth is text
    assert coordinator.flush(WAIT_S) and device.flush(WAIT_S)


def test_a_3mib_update_arrives_intact_through_128kib_chunks(net: Net) -> None:
    # Prepare
    max_chunk, size = 128 * 1024, 3 * 2**20 // 4  # 3 MiB of float32
    coordinator = connected(net.coordinator(max_chunk=max_chunk))
    device = connected(net.device("dev-1", max_chunk=max_chunk))
    message = update("dev-1", size=size)
    # Execute
    sent = device.send(message)
    status, got = take_messages(coordinator, 2)
    # Assert: bit-exact, chunk headers counted, every chunk used once
    assert status == Status("dev-1", True) and same(got, message)
    assert np.array_equal(vector_of(got, size), message.vector.arrays["values"])
    assert sent == device.bytes_sent == wire_bytes(message, max_chunk) > len(encode(message))
    assert coordinator.bytes_received == len(b"online") + sent
    stats = coordinator.stats()
    assert stats["frames_received"] == 1 + chunk_count(message, max_chunk)
    assert [stats[k] for k in ("chunks_completed", "chunks_pending", "chunks_rejected", "refused")] == [1, 0, 0, 0]


@pytest.mark.parametrize("size", [8, 75_000], ids=["small", "chunked-300kB"])
def test_only_the_newest_retained_global_reaches_a_late_device(net: Net, size: int) -> None:
    # Prepare: an older, chunked full global, then the newest, retained under 64 KiB chunks
    coordinator = connected(net.coordinator(max_chunk=64 * 1024))
    coordinator.send(full_global(0, size=50_000))  # 200 kB: 4 chunks
    newest = full_global(1, size=size)
    coordinator.send(newest)
    assert coordinator.flush(WAIT_S)
    late = net.device("dev-1")
    late.follow_full_global(True)
    # Execute
    connected(late)
    coordinator.send(delta_global(2))  # not retained: marks the end of what the late device gets
    # Assert: the newest global, then the marker; nothing left of the older one
    got, marker = take_messages(late, 2)
    assert same(got, newest) and same(marker, delta_global(2))
    assert late.stats()["chunks_pending"] == 0 and late.stats()["refused"] == 0


def test_follow_full_global_starts_and_stops_the_retained_full_global(net: Net) -> None:
    # Prepare: a retained full global before the device connects
    coordinator = connected(net.coordinator())
    coordinator.send(full_global(0))
    device = connected(net.device("dev-1"))
    # Execute + Assert: not followed, only the delta comes
    coordinator.send(delta_global(1))
    assert same(take_messages(device, 1)[0], delta_global(1))
    # followed: the retained full global comes
    device.follow_full_global(True)
    assert same(take_messages(device, 1)[0], full_global(0))
    # no longer followed: a new full global does not come, the next delta does
    device.follow_full_global(False)
    coordinator.send(full_global(1))
    coordinator.send(delta_global(2))
    assert same(take_messages(device, 1)[0], delta_global(2))


def test_the_coordinator_reads_a_status_in_text_or_message_form(net: Net) -> None:
    # Prepare
    coordinator = connected(net.coordinator())
    rogue = net.rogue()
    # Execute
    rogue.send(net.topics.status("dev-1"), b"online")
    rogue.send(net.topics.status("dev-2"), encode(Status("dev-2", online=False)))
    # Assert
    assert take_messages(coordinator, 2) == [Status("dev-1", True), Status("dev-2", False)]


# ---- presence ----------------------------------------------------------------------------------


def test_a_device_that_dies_leaves_offline_as_its_retained_will(net: Net) -> None:
    # Prepare
    coordinator = connected(net.coordinator())
    device = connected(net.device("dev-1"))
    assert take_messages(coordinator, 1) == [Status("dev-1", True)]
    # Execute: the connection drops without DISCONNECT, as a crash or a power cut leaves it
    device.close(abrupt=True)
    # Assert: the broker publishes the will, and keeps it for whoever comes later
    assert take_messages(coordinator, 1) == [Status("dev-1", False)]
    late = connected(net.coordinator("late"))
    assert take_messages(late, 1) == [Status("dev-1", False)]


def test_a_graceful_close_publishes_offline_itself(net: Net) -> None:
    # Prepare
    coordinator = connected(net.coordinator())
    device = connected(net.device("dev-1"))
    # Execute
    device.close()
    # Assert
    assert take_messages(coordinator, 2) == [Status("dev-1", True), Status("dev-1", False)]


# ---- sessions ----------------------------------------------------------------------------------


def test_a_persistent_session_keeps_what_came_while_away_and_a_send_waits_for_the_connection(net: Net) -> None:
    # Prepare: the device's session subscribes, then the device leaves; a delta (not retained) is sent
    connected(net.device("dev-1")).close()
    coordinator = connected(net.coordinator())
    coordinator.send(delta_global(1))
    assert coordinator.flush(WAIT_S)
    again = net.device("dev-1")  # the same client id: the same session
    again.send(update("dev-1"))  # QoS 1 before connecting: held until the connection is up
    # Execute
    connected(again)
    # Assert
    assert same(take_messages(again, 1)[0], delta_global(1))
    seen = take_messages(coordinator, 3)  # the retained offline, the new birth and the update, in either order
    assert sum(same(m, update("dev-1")) for m in seen) == 1
    assert [m for m in seen if isinstance(m, Status)][-1] == Status("dev-1", True)


def test_a_clean_start_discards_the_session(net: Net) -> None:
    # Prepare
    connected(net.device("dev-1")).close()
    coordinator = connected(net.coordinator())
    coordinator.send(delta_global(1))  # missed: only the old session would hold it
    assert coordinator.flush(WAIT_S)
    fresh = connected(net.device("dev-1", clean_start=True))
    # Execute
    coordinator.send(delta_global(2))
    # Assert
    assert same(take_messages(fresh, 1)[0], delta_global(2))


def test_subscriptions_and_the_birth_come_back_after_a_dropped_connection(mosquitto: Net) -> None:
    # Prepare: no broker session, so the link must subscribe again itself
    coordinator = connected(mosquitto.coordinator())
    device = connected(mosquitto.device("dev-1", clean_start=True))
    assert take_messages(coordinator, 1) == [Status("dev-1", True)]
    # Execute: the network drops under paho, which reconnects after its 1 s backoff
    device.connection._client.socket().shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

    def delta_arrives() -> Incoming | None:
        coordinator.send(delta_global(1))
        item = device.receive(0.25)
        return item if isinstance(item, Incoming) else None
    got = poll(delta_arrives, "a delta after the reconnect")

    def birth_again() -> Status | None:
        item = coordinator.receive(0.25)
        online = isinstance(item, Incoming) and item.message == Status("dev-1", True)
        return item.message if online else None  # type: ignore[union-attr,return-value]
    # Assert: deltas reach the device again, and the device said it is online again
    assert same(got.message, delta_global(1)) and device.connected
    poll(birth_again, "the online status published again after the reconnect")


# ---- what the link refuses ----------------------------------------------------------------------

# (reader, topic, payload, reason prefix); topics relative to the test's Topics
REFUSALS = {
    "update-on-task-topic": ("device", lambda t: t.task, lambda: encode(update()), "bad header"),
    "delta-on-full-global-topic": ("device", lambda t: t.global_params, lambda: encode(delta_global()), "bad header"),
    "full-global-on-delta-topic": ("device", lambda t: t.global_delta, lambda: encode(full_global()), "bad header"),
    "task-on-update-topic": ("coordinator", lambda t: t.update("dev-1"), lambda: encode(task()), "bad header"),
    "update-on-status-topic": ("coordinator", lambda t: t.status("dev-1"), lambda: encode(update()), "bad header"),
    "update-from-another-device": ("coordinator", lambda t: t.update("dev-2"), lambda: encode(update("dev-1")),
                                   "device id mismatch"),
    "error-from-another-device": ("coordinator", lambda t: t.update("dev-2"), lambda: encode(error_reply("dev-1")),
                                  "device id mismatch"),
    "status-of-another-device": ("coordinator", lambda t: t.status("dev-2"),
                                 lambda: encode(Status("dev-1", True)), "device id mismatch"),
    "garbage-update": ("coordinator", lambda t: t.update("dev-1"), lambda: b"garbage, not a message", "bad magic"),
    "garbage-status": ("coordinator", lambda t: t.status("dev-1"), lambda: b"maybe", "truncated message"),
    "garbage-task": ("device", lambda t: t.task, lambda: b"\x00" * 64, "bad magic"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_the_link_refuses_what_does_not_belong_where_it_arrives(net: Net, case: str) -> None:
    # Prepare
    role, topic_of, payload_of, reason = REFUSALS[case]
    reader = net.device("dev-1") if role == "device" else net.coordinator()
    if role == "device":
        reader.follow_full_global(True)
    connected(reader)
    topic = topic_of(net.topics)
    # Execute
    net.rogue().send(topic, payload_of())
    # Assert: refused, named, counted; the sender named by the topic
    (item,) = take(reader, 1)
    assert isinstance(item, Refused) and item.reason.startswith(reason + ":"), item
    assert item.kind == reason and item.topic == topic
    assert (item.place, item.device_id) == net.topics.parse(topic)
    assert (reader.stats()["refused"], reader.stats()["delivered"]) == (1, 0)


def test_hostile_chunks_are_refused_once_per_message_and_delivery_goes_on(net: Net) -> None:
    # Prepare: a coordinator accepting messages up to 100 kB, and a rogue sending as dev-9
    coordinator = connected(net.coordinator(max_chunk=64 * 1024, max_message_bytes=100_000))
    rogue, topic = net.rogue(), net.topics.update("dev-9")
    # Execute: two oversized chunked messages (4 chunks each), an oversized single frame, a
    # broken chunk, then a valid update
    rogue.send(topic, b"x" * 200_000)
    rogue.send(topic, b"y" * 200_000)
    rogue.frame(topic, b"z" * 150_000)
    rogue.frame(topic + "/_c/0", b"EFTC garbage")
    rogue.send(topic, encode(update("dev-9")))
    items = take(coordinator, 5)
    # Assert: each bad message reported once, not once per chunk; every chunk counted
    assert [i.kind for i in items[:4]] == ["oversized message"] * 3 + ["bad chunk"]  # type: ignore[union-attr]
    assert all(isinstance(i, Refused) and i.topic == topic and i.device_id == "dev-9" for i in items[:4])
    assert isinstance(items[4], Incoming) and same(items[4].message, update("dev-9"))
    stats = coordinator.stats()
    assert (stats["refused"], stats["delivered"], stats["chunks_rejected"]) == (4, 1, 4 + 4 + 1)
    assert coordinator.receive(0.0) is None


def test_beyond_max_queue_messages_are_dropped_and_counted(net: Net) -> None:
    # Prepare: a coordinator that holds at most 3 unread messages
    coordinator = connected(net.coordinator(max_queue=3))
    sender = connected(net.sender())
    # Execute: 5 replies arrive while nobody reads
    for round_index in range(5):
        sender.send(error_reply("dev-1", round_index))
    poll(lambda: coordinator.stats()["queued"] + coordinator.stats()["dropped"] == 5 or None, "5 arrivals")
    # Assert: the first 3 kept in order, the last 2 dropped and counted
    assert [m.round for m in take_messages(coordinator, 3)] == [0, 1, 2]  # type: ignore[union-attr]
    assert coordinator.stats()["dropped"] == 2 and coordinator.receive(0.0) is None


# ---- status forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, online", [
    (b"online", True), (b"offline", False),
    (encode(Status("dev-1", True)), True), (encode(Status("dev-1", False)), False),
], ids=["text-online", "text-offline", "message-online", "message-offline"])
def test_a_status_parses_in_either_form(payload: bytes, online: bool) -> None:
    assert status_from_payload(payload, "dev-1", 4096) == Status("dev-1", online)


@pytest.mark.parametrize("payload", [b"Online", b"", encode(task())], ids=["capitalised", "empty", "a-task"])
def test_anything_else_is_not_a_status(payload: bytes) -> None:
    with pytest.raises(MessageError):
        status_from_payload(payload, "dev-1", 4096)


# ---- connections and URLs -------------------------------------------------------------------------


def test_connect_timeout_names_the_broker() -> None:
    # Prepare: a port nothing listens on once the socket is closed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = Link.coordinator(MqttConnection(f"mqtt://127.0.0.1:{port}", "nobody"), "fl")
    # Execute + Assert
    with pytest.raises(LinkError, match=f"mqtt://127.0.0.1:{port}"):
        link.connect(timeout_s=1.0)


@pytest.mark.parametrize("bad", ["http://h", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "mqtt://h?x=1"])
def test_bad_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_url(bad)
    with pytest.raises(ValueError, match="broker URL"):
        MqttConnection(bad, "dev-1")


def test_url_forms() -> None:
    assert parse_url("mqtt://gw") == ("gw", 1883, False, "3.1.1", None)
    assert parse_url("mqtt5://u%40x@10.0.0.2:1884") == ("10.0.0.2", 1884, False, "5", "u@x")
    assert parse_url("mqtts://gw")[1:3] == (8883, True)
    assert parse_url("mqtts5://gw")[1:4] == (8883, True, "5")


# ---- embedded amqtt broker ------------------------------------------------------------------------


@pytest.fixture
def amqtt_net() -> Iterator[Net]:
    try:
        from amqtt.broker import Broker
    except ImportError:
        if in_ci():
            pytest.fail("CI is set and amqtt is not installed (pip install -e '.[sim]')", pytrace=False)
        pytest.skip("amqtt is not installed (pip install -e '.[sim]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    broker = None

    async def start() -> None:
        nonlocal broker
        broker = Broker(config)
        await broker.start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT_S)
    net = Net("amqtt", url=f"mqtt://127.0.0.1:{port}")
    try:
        yield net
    finally:
        net.close_all()
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(WAIT_S)  # type: ignore[union-attr]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def test_round_trip_through_the_embedded_amqtt_broker(amqtt_net: Net) -> None:
    # Prepare
    coordinator = connected(amqtt_net.coordinator(max_chunk=64 * 1024))
    device = connected(amqtt_net.device("dev-1", max_chunk=64 * 1024))
    small, large = update("dev-1", seq=1), update("dev-1", size=80_000, seq=2)  # 320 kB: chunked
    # Execute
    device.send(small)
    device.send(large)
    # Assert
    status, *updates = take_messages(coordinator, 3)
    assert status == Status("dev-1", True)
    assert sorted(m.seq for m in updates) == [1, 2]  # type: ignore[union-attr]
    assert all(same(m, small if m.seq == 1 else large) for m in updates)  # type: ignore[union-attr]


# ---- the in-process broker's MQTT semantics ---------------------------------------------------------


def test_in_process_wildcards() -> None:
    # Prepare: one bare connection per filter
    broker = InProcessBroker()
    seen: dict[str, list[str]] = {}
    for topic_filter in ("fl/update/+", "fl/#", "fl/task"):
        connection = InProcessConnection(broker, f"sub-{len(seen)}")
        seen[topic_filter] = []
        connection.on_frame = lambda topic, frame, got=seen[topic_filter]: got.append(topic)
        connection.subscribe([topic_filter])
        connection.connect()
    publisher = InProcessConnection(broker, "pub")
    publisher.connect()
    # Execute
    for topic in ("fl/update/d1", "fl/update/d1/x", "fl/task", "other/task", "fl"):
        publisher.send(topic, topic.encode(), 1, False)
    # Assert
    assert seen == {"fl/update/+": ["fl/update/d1"], "fl/#": ["fl/update/d1", "fl/update/d1/x", "fl/task", "fl"],
                    "fl/task": ["fl/task"]}


def test_in_process_retained_chunks_are_replaced_not_mixed() -> None:
    # Prepare: the retained frames a chunked global leaves, then a smaller unchunked one
    broker = InProcessBroker()
    coordinator = Link(InProcessConnection(broker, "coord"), "fl", [], max_chunk=1024)
    coordinator.connect()
    old = full_global(0, size=2000)  # 8 kB: chunked at 1 KiB
    coordinator.send(old)
    chunked = set(broker.retained())
    # Execute
    coordinator.send(full_global(1, size=8))
    # Assert: only the new global is retained; every chunk of the old one is gone
    assert broker.retained() == {"fl/global": encode(full_global(1, size=8))}
    assert chunked == {f"fl/global/_c/{i}" for i in range(chunk_count(old, 1024))}


# ---- topics and framing rules ------------------------------------------------------------------------


def test_topic_names() -> None:
    t = Topics("edgeftl/run1")
    assert (t.task, t.global_params, t.global_delta) == ("edgeftl/run1/task", "edgeftl/run1/global",
                                                         "edgeftl/run1/global/delta")
    assert t.update("dev-1") == "edgeftl/run1/update/dev-1" and t.status("d.2") == "edgeftl/run1/status/d.2"
    assert (t.updates_filter, t.status_filter) == ("edgeftl/run1/update/+", "edgeftl/run1/status/+")
    assert [t.parse(x) for x in ("edgeftl/run1/update/dev-1", "edgeftl/run1/status/d.2", "edgeftl/run1/task",
                                 "edgeftl/run1/global", "edgeftl/run1/global/delta")] == [
        ("update", "dev-1"), ("status", "d.2"), ("task", None), ("global", None), ("delta", None)]
    assert [t.parse(x) for x in ("edgeftl/run1/update/a/b", "edgeftl/run1/update/-x", "other/task")] == [None] * 3


@pytest.mark.parametrize("device_id", ["", "a/b", "a+", "a#", "_c", "-x", "x" * 65, "é"])
def test_bad_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        Topics("fl").update(device_id)
    with pytest.raises(ValueError, match="device id"):
        Link.device(InProcessConnection(InProcessBroker(), "c"), "fl", device_id)


@pytest.mark.parametrize("prefix", ["", "/fl", "fl/", "a//b", "fl/+", "fl/#", "$SYS", "fl/_c", "x" * 129])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topics(prefix)
    with pytest.raises(ValueError, match="prefix"):
        Link.coordinator(InProcessConnection(InProcessBroker(), "c"), prefix)


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+", "a", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("a/b", "a/b", True), ("a/b", "a/b/c", False),
])
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic, payload", [("a/+", b"x"), ("a/#", b"x"), ("a/_c/3", b"x"), ("a", b""),
                                            ("a", b"x" * 4097)],
                         ids=["plus", "hash", "chunk-topic", "empty", "oversized"])
def test_framing_refuses_wildcards_reserved_chunk_topics_and_bad_sizes(topic: str, payload: bytes) -> None:
    with pytest.raises(ValueError):
        Framer(1024, 4096).frames(topic, payload, False)


@pytest.mark.parametrize("bad_filter", ["a/#/b", "a/b+", "a/#x", ""])
def test_connections_refuse_bad_filters(bad_filter: str) -> None:
    for connection in (InProcessConnection(InProcessBroker(), "c"), MqttConnection("mqtt://127.0.0.1", "c")):
        with pytest.raises(ValueError, match="filter"):
            connection.subscribe([bad_filter])
