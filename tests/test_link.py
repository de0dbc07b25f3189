"""Transports against real brokers (Mosquitto, embedded amqtt) and the in-process broker."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest

from conftest import in_ci
from edgeftl.device.protocol import wire
from edgeftl.device.link import (
    InProcessBroker, InProcessTransport, MqttTransport, Topics, TransportError, parse_url, topic_matches,
)

WAIT_S = 10.0
VERSIONS = ["3.1.1", "5"]
ID_LEN = 32  # the transports use uuid4().hex as chunk message ids


class Inbox:
    """Collects (topic, payload) from a callback, with bounded waits."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.items.append((topic, payload))
            self._cond.notify_all()

    def wait(self, count: int = 1, timeout_s: float = WAIT_S) -> list[tuple[str, bytes]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= count, timeout_s), \
                f"expected {count} messages, got {len(self.items)}"
            return list(self.items)


def unique(name: str) -> str:
    return f"t{uuid.uuid4().hex[:10]}/{name}"


def wire_bytes(payload: bytes, max_chunk: int) -> int:
    """What a transport hands to the network for `payload`: chunk headers included."""
    if len(payload) <= max_chunk:
        return len(payload)
    return sum(len(c) for c in wire.split(payload, max_chunk, "x" * ID_LEN))


@pytest.fixture
def url(mosquitto_broker: tuple[str, int]) -> str:
    host, port = mosquitto_broker
    return f"mqtt://{host}:{port}"


@pytest.fixture
def clients() -> Iterator[list[MqttTransport]]:
    """Transports made by a test; all closed at the end, whatever happened."""
    made: list[MqttTransport] = []
    yield made
    for client in made:
        client.close()


def make(clients: list, url: str, client_id: str | None = None, **kwargs: object) -> MqttTransport:
    transport = MqttTransport(url, client_id or unique("c").replace("/", "-"), **kwargs)
    clients.append(transport)
    return transport


def connected(transport: MqttTransport) -> MqttTransport:
    transport.connect(WAIT_S)
    return transport


# ---- real Mosquitto -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_qos1_publish_subscribe_and_byte_counters(url: str, clients: list, version: str) -> None:
    topic, payload = unique("a"), bytes(range(256)) * 40
    inbox = Inbox()
    sub = make(clients, url, version=version)
    sub.subscribe(topic, inbox)
    connected(sub)
    pub = connected(make(clients, url, version=version))

    sent = pub.publish(topic, payload)

    assert inbox.wait(1) == [(topic, payload)]
    assert sent == pub.bytes_sent == len(payload)
    assert sub.bytes_received == len(payload)
    assert pub.flush(WAIT_S)


def test_a_3mb_payload_arrives_intact_through_128kib_chunks(url: str, clients: list) -> None:
    topic, max_chunk = unique("big"), 128 * 1024
    payload = uuid.uuid4().bytes * (3 * 2**20 // 16)
    inbox = Inbox()
    sub = make(clients, url, max_chunk=max_chunk)
    sub.subscribe(topic, inbox)
    connected(sub)
    pub = connected(make(clients, url, max_chunk=max_chunk))

    sent = pub.publish(topic, payload)

    assert inbox.wait(1) == [(topic, payload)]
    assert sent == pub.bytes_sent == wire_bytes(payload, max_chunk) > len(payload)
    assert sub.wait_idle(WAIT_S) and sub.bytes_received == sent
    stats = sub.stats()
    assert stats["frames_received"] == -(-len(payload) // (max_chunk - wire.CHUNK_FIXED_BYTES - ID_LEN))
    assert stats["chunks_completed"] == 1 and stats["chunks_pending"] == 0 and stats["rejected"] == 0


@pytest.mark.parametrize("size", [100, 300_000])
def test_retained_message_reaches_a_late_subscriber(url: str, clients: list, size: int) -> None:
    topic = unique("global")
    pub = connected(make(clients, url, max_chunk=64 * 1024))
    pub.publish(topic, b"A" * 200_000, retain=True)  # an older retained message, chunked
    newest = uuid.uuid4().bytes * (size // 16)
    pub.publish(topic, newest, retain=True)
    assert pub.flush(WAIT_S)
    inbox = Inbox()
    late = make(clients, url)
    late.subscribe(topic, inbox)

    connected(late)

    assert inbox.wait(1) == [(topic, newest)]
    assert late.wait_idle(WAIT_S) and inbox.items == [(topic, newest)]  # the older one is gone


def test_will_is_published_retained_when_a_client_dies(url: str, clients: list) -> None:
    topics = Topics(unique("fl"))
    status = topics.status("dev-1")
    watcher_inbox = Inbox()
    watcher = make(clients, url)
    watcher.subscribe(topics.status_filter, watcher_inbox)
    connected(watcher)
    device = connected(make(clients, url, will=(status, b"offline"), birth=(status, b"online")))
    assert watcher_inbox.wait(1) == [(status, b"online")]

    device.close(abrupt=True)  # TCP close without DISCONNECT, as a crash or power cut

    assert watcher_inbox.wait(2)[1] == (status, b"offline")
    late_inbox = Inbox()
    late = make(clients, url)
    late.subscribe(topics.status_filter, late_inbox)
    connected(late)
    assert late_inbox.wait(1) == [(status, b"offline")]


def test_graceful_close_publishes_the_will_itself(url: str, clients: list) -> None:
    status = unique("status/dev-2")
    inbox = Inbox()
    watcher = make(clients, url)
    watcher.subscribe(status, inbox)
    connected(watcher)
    device = connected(make(clients, url, will=(status, b"offline"), birth=(status, b"online")))

    device.close()

    assert inbox.wait(2) == [(status, b"online"), (status, b"offline")]


@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_session_delivers_what_was_published_while_away(url: str, clients: list,
                                                                  version: str) -> None:
    topic, client_id = unique("task"), f"dev-{uuid.uuid4().hex[:8]}"
    first = make(clients, url, client_id, version=version)
    first.subscribe(topic, Inbox())
    connected(first).close()
    pub = connected(make(clients, url, version=version))
    pub.publish(topic, b"round 7")
    assert pub.flush(WAIT_S)
    inbox = Inbox()
    again = make(clients, url, client_id, version=version)
    again.subscribe(topic, inbox)  # registered before connect: queued messages are matched

    connected(again)

    assert inbox.wait(1) == [(topic, b"round 7")]


def test_clean_start_discards_the_session(url: str, clients: list) -> None:
    topic, client_id = unique("task"), f"dev-{uuid.uuid4().hex[:8]}"
    first = make(clients, url, client_id)
    first.subscribe(topic, Inbox())
    connected(first).close()
    pub = connected(make(clients, url))
    pub.publish(topic, b"missed")
    assert pub.flush(WAIT_S)
    inbox = Inbox()
    fresh = make(clients, url, client_id, clean_start=True)
    fresh.subscribe(topic, inbox)
    connected(fresh)
    pub.publish(topic, b"live")

    assert inbox.wait(1) == [(topic, b"live")]


def test_subscriptions_come_back_after_a_dropped_connection(url: str, clients: list) -> None:
    topic = unique("t")
    inbox = Inbox()
    sub = make(clients, url, clean_start=True)  # no broker session: on_connect must resubscribe
    sub.subscribe(topic, inbox)
    connected(sub)
    pub = connected(make(clients, url))

    sub._client.socket().shutdown(socket.SHUT_RDWR)  # the network drops; paho reconnects (1 s backoff)
    for _ in range(int(WAIT_S / 0.5)):
        pub.publish(topic, b"ping")
        if inbox.items:
            break
        threading.Event().wait(0.5)

    assert inbox.wait(1)[0] == (topic, b"ping")
    assert sub.connected


def test_a_raising_callback_is_counted_and_delivery_goes_on(url: str, clients: list) -> None:
    topic = unique("t")
    inbox = Inbox()

    def explode(topic: str, payload: bytes) -> None:
        if payload == b"bad":
            raise RuntimeError("callback bug")
        inbox(topic, payload)

    sub = make(clients, url)
    sub.subscribe(topic, explode)
    connected(sub)
    pub = connected(make(clients, url))
    pub.publish(topic, b"bad")
    pub.publish(topic, b"good")

    assert inbox.wait(1) == [(topic, b"good")]
    assert sub.callback_errors == 1


def test_hostile_chunks_are_rejected_and_reported(url: str, clients: list) -> None:
    topic = unique("update/dev-9")
    inbox, rejects = Inbox(), Inbox()
    sub = make(clients, url, max_chunk=64 * 1024, max_message_bytes=100_000, on_reject=rejects)
    sub.subscribe(topic, inbox)
    connected(sub)
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile")
    host, port = parse_url(url)[:2]
    raw.connect(host, port)
    raw.loop_start()
    try:
        oversized = wire.split(b"x" * 200_000, 64 * 1024, "m1")[0]
        raw.publish(f"{topic}/_c/0", oversized, qos=1).wait_for_publish(WAIT_S)
        raw.publish(f"{topic}/_c/0", b"EFTC garbage", qos=1).wait_for_publish(WAIT_S)
    finally:
        raw.loop_stop()
        raw.disconnect()

    reasons = [reason for _, reason in rejects.wait(2)]
    assert "oversized" in reasons[0] and "chunk" in reasons[1]
    assert inbox.items == [] and sub.stats()["rejected"] == 2


def test_connect_timeout_names_the_broker() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    transport = MqttTransport(f"mqtt://127.0.0.1:{port}", "nobody")

    with pytest.raises(TransportError, match=f"mqtt://127.0.0.1:{port}"):
        transport.connect(timeout_s=1.0)


@pytest.mark.parametrize("bad", ["http://h", "mqtt://", "mqtt://h:99999", "mqtt://h/path", "mqtt://h?x=1"])
def test_bad_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_url(bad)


def test_url_forms() -> None:
    assert parse_url("mqtt://gw") == ("gw", 1883, False, "3.1.1", None, None)
    assert parse_url("mqtt5://u:p%40ss@10.0.0.2:1884") == ("10.0.0.2", 1884, False, "5", "u", "p@ss")
    assert parse_url("mqtts://gw")[1:3] == (8883, True)


# ---- embedded amqtt broker --------------------------------------------------------------------


@pytest.fixture
def amqtt_url() -> Iterator[str]:
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
    holder: dict[str, object] = {}
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}

    async def start() -> None:
        holder["broker"] = Broker(config)
        await holder["broker"].start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(WAIT_S)
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(holder["broker"].shutdown(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


def test_round_trip_through_the_embedded_amqtt_broker(amqtt_url: str, clients: list) -> None:
    topic = unique("a")
    small, large = b"hello", uuid.uuid4().bytes * 20_000  # 320 kB: chunked at 64 KiB
    inbox = Inbox()
    sub = make(clients, amqtt_url, max_chunk=64 * 1024)
    sub.subscribe(topic, inbox)
    connected(sub)
    pub = connected(make(clients, amqtt_url, max_chunk=64 * 1024))

    pub.publish(topic, small)
    pub.publish(topic, large)

    assert sorted(inbox.wait(2)) == sorted([(topic, small), (topic, large)])


# ---- in-process broker ------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["threaded", "synchronous"])
def broker(request: pytest.FixtureRequest) -> InProcessBroker:
    return InProcessBroker(synchronous=request.param)


def test_in_process_wildcards(broker: InProcessBroker) -> None:
    plus, hash_, exact = Inbox(), Inbox(), Inbox()
    sub = InProcessTransport(broker, "sub")
    sub.subscribe("fl/update/+", plus)
    sub.subscribe("fl/#", hash_)
    sub.subscribe("fl/task", exact)
    sub.connect()
    pub = InProcessTransport(broker, "pub")
    pub.connect()

    for topic in ("fl/update/d1", "fl/update/d1/x", "fl/task", "other/task", "fl"):
        pub.publish(topic, topic.encode())
    assert broker.drain()

    assert [t for t, _ in plus.items] == ["fl/update/d1"]
    assert [t for t, _ in hash_.items] == ["fl/update/d1", "fl/update/d1/x", "fl/task", "fl"]
    assert [t for t, _ in exact.items] == ["fl/task"]


def test_in_process_retained_and_chunked(broker: InProcessBroker) -> None:
    pub = InProcessTransport(broker, "coordinator", max_chunk=1024)
    pub.connect()
    params = bytes(range(256)) * 20  # 5120 bytes: 6 chunks
    pub.publish("fl/global", b"old" * 1000, retain=True)
    pub.publish("fl/global", params, retain=True)
    pub.publish("fl/global", b"x", retain=False)  # not retained: late joiners never see it
    inbox = Inbox()
    late = InProcessTransport(broker, "late")
    late.subscribe("fl/global", inbox)

    late.connect()
    assert broker.drain()

    assert inbox.items == [("fl/global", params)]
    assert late.bytes_received == pub.publish("fl/other", params) == wire_bytes(params, 1024)


def test_in_process_will_on_abrupt_close_and_on_graceful_close(broker: InProcessBroker) -> None:
    inbox = Inbox()
    watcher = InProcessTransport(broker, "coordinator")
    watcher.subscribe("fl/status/+", inbox)
    watcher.connect()
    a = InProcessTransport(broker, "a", will=("fl/status/a", b"offline"), birth=("fl/status/a", b"online"))
    b = InProcessTransport(broker, "b", will=("fl/status/b", b"offline"))
    a.connect()
    b.connect()

    a.close(abrupt=True)
    b.close()
    assert broker.drain()

    assert inbox.items == [("fl/status/a", b"online"), ("fl/status/a", b"offline"), ("fl/status/b", b"offline")]
    assert broker.retained()["fl/status/a"] == b"offline"


def test_in_process_persistent_session_and_offline_queue(broker: InProcessBroker) -> None:
    first = InProcessTransport(broker, "dev")
    first.subscribe("fl/task", Inbox())
    first.connect()
    first.close()
    pub = InProcessTransport(broker, "coordinator")
    pub.connect()
    pub.publish("fl/task", b"round 1")
    inbox = Inbox()
    again = InProcessTransport(broker, "dev")
    again.subscribe("fl/task", inbox)
    again.publish("fl/task", b"sent while offline")  # QoS 1: queued until connected

    again.connect()
    assert broker.drain()

    assert inbox.items == [("fl/task", b"round 1"), ("fl/task", b"sent while offline")]


def test_in_process_callback_errors_are_counted(broker: InProcessBroker) -> None:
    def explode(topic: str, payload: bytes) -> None:
        raise ValueError("bug")

    sub = InProcessTransport(broker, "sub")
    sub.subscribe("t", explode)
    sub.connect()
    InProcessTransport(broker, "pub").connect()
    sub.publish("t", b"1")
    assert broker.drain()

    assert sub.callback_errors == 1


# ---- topics -------------------------------------------------------------------------------------


def test_topic_names() -> None:
    t = Topics("edgeftl/run1")
    assert (t.task, t.global_params, t.global_delta) == ("edgeftl/run1/task", "edgeftl/run1/global",
                                                         "edgeftl/run1/global/delta")
    assert t.update("dev-1") == "edgeftl/run1/update/dev-1" and t.status("d.2") == "edgeftl/run1/status/d.2"
    assert (t.updates_filter, t.status_filter) == ("edgeftl/run1/update/+", "edgeftl/run1/status/+")
    assert t.device_of("edgeftl/run1/update/dev-1") == "dev-1" and t.device_of("edgeftl/run1/task") is None


@pytest.mark.parametrize("device_id", ["", "a/b", "a+", "a#", "_c", "-x", "x" * 65, "é"])
def test_bad_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        Topics("fl").update(device_id)


@pytest.mark.parametrize("prefix", ["", "/fl", "fl/", "a//b", "fl/+", "fl/#", "$SYS", "fl/_c", "x" * 129])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        Topics(prefix)


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/+", "a/b/c", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("#", "a/b", True), ("+", "a", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("a/b", "a/b", True), ("a/b", "a/b/c", False),
])
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_publish_refuses_wildcards_reserved_chunk_topics_and_empty_payloads(broker: InProcessBroker) -> None:
    t = InProcessTransport(broker, "p")
    for topic, payload in (("a/+", b"x"), ("a/_c/3", b"x"), ("a", b"")):
        with pytest.raises(ValueError):
            t.publish(topic, payload)
