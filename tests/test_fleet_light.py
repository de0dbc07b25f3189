"""Light devices (coordinator/simulation/light.py): what they send decodes with the coordinator's own
decoder and inbox; replies follow the protocol (updates, error replies, resends, dropouts)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeftl.coordinator.rounds.inbox import DeviceFailure, Inbox, ReceivedUpdate
from edgeftl.coordinator.simulation.fleet_cli import _without_slice
from edgeftl.coordinator.simulation.light import Behaviour, LightDevice, Shared
from edgeftl.device.agent import GLOBAL_WAIT_S
from edgeftl.device.link.framing import Framer
from edgeftl.device.protocol.codecs import Encoded, parse_codec
from edgeftl.device.protocol.messages import (
    Global,
    Status,
    Task,
    Update,
    check_place,
    decode,
    encode,
    largest_update_bytes,
    status_from_payload,
    status_payload,
)

SHA = "ab" * 32
SIZE = 3000
RUN = "run-light"


class RecordingPort:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []
        self.dropped: list[float] = []

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published.append((topic, payload, retain))

    def subscribe(self, filters: list[str]) -> None:
        self.subscribed += filters

    def unsubscribe(self, filters: list[str]) -> None:
        self.unsubscribed += filters

    def drop(self, offline_s: float) -> None:
        self.dropped.append(offline_s)

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.published if t == topic]


def device(behaviour: Behaviour | None = None, name: str = "light-0") -> tuple[LightDevice, RecordingPort, Shared]:
    shared, port = Shared("edgeftl", SHA, SIZE, seed=3), RecordingPort()
    light = LightDevice(name, shared, behaviour or Behaviour(), port)
    light.on_connect()
    return light, port, shared


def feed(light: LightDevice, topic: str, message: Global | Task, now: float = 0.0) -> None:
    for frame_topic, frame in Framer(1 << 20, 1 << 24).frames(topic, encode(message), False):
        light.on_frame(frame_topic, frame, now)


def initial_global(round_index: int = -1) -> Global:
    return Global(RUN, round_index, SHA, Encoded("none", SIZE, {"values": np.zeros(SIZE, np.float32)}))


def task(devices: tuple[str, ...] = ("light-0", "light-9"), codec: str = "topk:0.1+int8",
         bundle: str = SHA) -> Task:
    return Task(RUN, 0, bundle, devices, 30.0, 0.01, codec, steps=5)


def replies(port: RecordingPort, shared: Shared, name: str = "light-0") -> list:
    """The device's replies as the coordinator's link reads them (decode + check_place)."""
    out = []
    for payload in port.on(shared.topics.update(name)):
        message = decode(payload, largest_update_bytes(SIZE))
        check_place("update", name, message)
        out.append(message)
    return out


def test_birth_will_and_subscriptions_follow_the_protocol():
    light, port, shared = device()
    topic, birth, will = light.presence()
    assert port.published[0] == (topic, birth, True) and topic == shared.topics.status("light-0")
    assert status_from_payload(birth, "light-0", 1 << 16).online
    gone = status_from_payload(will, "light-0", 1 << 16)
    assert not gone.online and gone.info["will"] == 1 and gone.info["bundle_sha256"] == SHA
    memory = status_from_payload(birth, "light-0", 1 << 16).info["mem_available_mib"]
    assert 256 <= memory <= 4096 and memory == light.memory_mib()  # fixed per id, for --sample memory
    t = shared.topics
    assert set(port.subscribed) == {*Framer.filters(t.task), *Framer.filters(t.global_delta),
                                    *Framer.filters(t.global_params), topic}


def test_a_stale_will_on_its_own_status_is_answered_with_its_birth():
    """A NATS node may publish a device's will after the device already reconnected elsewhere; the device
    sees its own status and publishes its birth again (its own birth coming back is left alone)."""
    light, port, _ = device()
    topic, will = light.will()  # as the fleet gives it to the connection
    birth = light.presence()[1]
    light.on_frame(topic, birth, 0.0)
    light.on_frame(topic, status_payload(Status("light-0", False)), 0.0)  # not its will: someone else's word
    assert port.on(topic) == [birth]
    light.on_frame(topic, will, 0.0)
    assert port.on(topic) == [birth, birth]
    light.on_frame(topic, light.goodbye(), 0.0)  # leaving: its own farewell stays
    assert port.on(topic) == [birth, birth]


def test_update_decodes_with_the_coordinators_inbox():
    light, port, shared = device()
    feed(light, shared.topics.global_params, initial_global())
    assert port.unsubscribed == Framer.filters(shared.topics.global_params)  # synced: deltas only from now
    feed(light, shared.topics.task, task())
    (update,) = replies(port, shared)
    assert isinstance(update, Update) and update.samples == 32 and update.metrics["samples"] == 32
    assert update.vector.codec == parse_codec("topk:0.1+int8").spec
    inbox = Inbox(RUN, SHA, SIZE)
    inbox.open_round(0, ["light-0", "light-9"])
    taken = inbox.take(update, len(port.on(shared.topics.update("light-0"))[0]))
    assert isinstance(taken, ReceivedUpdate)
    expected = parse_codec("topk:0.1+int8").roundtrip(shared.delta)[1]
    np.testing.assert_array_equal(taken.delta, expected)
    assert np.count_nonzero(taken.delta) == int(0.1 * SIZE)
    card = status_from_payload(port.on(shared.topics.status("light-0"))[-1], "light-0", 1 << 16)
    assert card.online and card.info["last_round"] == 0 and card.info["rounds_done"] == 1


def test_a_task_for_others_gets_nothing_and_a_delay_holds_the_reply():
    light, port, shared = device(Behaviour(delay_s=2.0, spread=1.0))
    feed(light, shared.topics.global_params, initial_global())
    feed(light, shared.topics.task, task(devices=("light-5",)))
    feed(light, shared.topics.task, task(), now=100.0)
    assert replies(port, shared) == [] and light.next_due() == pytest.approx(102.0)
    light.tick(101.9)
    assert replies(port, shared) == []
    light.tick(102.0)
    assert len(replies(port, shared)) == 1


def test_no_global_and_bundle_mismatch_are_error_replies_the_inbox_takes():
    light, port, shared = device()
    feed(light, shared.topics.task, task(), now=0.0)  # no global ever arrives
    light.tick(GLOBAL_WAIT_S + 0.1)
    other, other_port, _ = device(name="light-9")
    feed(other, shared.topics.global_params, initial_global())
    feed(other, shared.topics.task, task(bundle="cd" * 32))
    inbox = Inbox(RUN, SHA, SIZE)
    inbox.open_round(0, ["light-0", "light-9"])
    (first,) = replies(port, shared)
    (second,) = replies(other_port, shared, "light-9")
    assert (first.code, second.code) == ("no_global", "bundle_mismatch")
    assert isinstance(inbox.take(first, 1), DeviceFailure)
    assert second.bundle_sha256 == "cd" * 32  # the task's bundle, as a real device answers


def test_failure_and_dropout_draws():
    failing, port, shared = device(Behaviour(fail=1.0))
    feed(failing, shared.topics.global_params, initial_global())
    feed(failing, shared.topics.task, task())
    assert [r.code for r in replies(port, shared)] == ["train_failed"]
    vanishing, port, shared = device(Behaviour(dropout=1.0, offline_s=7.0))
    feed(vanishing, shared.topics.global_params, initial_global())
    feed(vanishing, shared.topics.task, task())
    assert port.dropped == [7.0] and replies(port, shared) == []


def test_the_retained_task_again_brings_the_same_reply_until_the_round_closes():
    light, port, shared = device()
    feed(light, shared.topics.global_params, initial_global())
    feed(light, shared.topics.task, task())
    feed(light, shared.topics.task, task())  # after a reconnect: the retained task again
    first, again = port.on(shared.topics.update("light-0"))
    assert first == again
    feed(light, shared.topics.global_params, initial_global(0))  # round 0 closed
    feed(light, shared.topics.task, task())
    assert len(port.on(shared.topics.update("light-0"))) == 2


def test_behaviour_and_cli_slices_refuse_or_strip():
    with pytest.raises(ValueError, match="probabilities"):
        Behaviour(fail=0.7, dropout=0.5)
    assert _without_slice(["--devices", "10", "--procs=2", "--first", "3", "--bundle", "b"]) == ["--bundle", "b"]
