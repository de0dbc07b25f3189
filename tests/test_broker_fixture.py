"""The shared `mosquitto_broker` fixture carries a QoS 1 message between paho-mqtt 2 clients."""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt

TIMEOUT_S = 10.0


def test_broker_round_trips_a_qos1_message(mosquitto_broker: tuple[str, int]) -> None:
    host, port = mosquitto_broker
    topic = f"edgeftl/test/{uuid.uuid4().hex}"
    payload = bytes(range(256)) * 4  # binary, 1 KiB
    subscribed, received = threading.Event(), threading.Event()
    messages: list[mqtt.MQTTMessage] = []

    # paho-mqtt 2 callback signatures (CallbackAPIVersion.VERSION2).
    def on_connect(client: mqtt.Client, userdata: object, *_: object) -> None:
        client.subscribe(topic, qos=1)

    def on_subscribe(client: mqtt.Client, userdata: object, *_: object) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        messages.append(message)
        received.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{topic[-8:]}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        assert subscribed.wait(TIMEOUT_S), "no SUBACK from the broker"
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=TIMEOUT_S)
        assert info.is_published(), "no PUBACK from the broker"
        assert received.wait(TIMEOUT_S), "the published message did not come back"
    finally:
        client.loop_stop()
        client.disconnect()

    assert len(messages) == 1
    assert messages[0].topic == topic
    assert messages[0].payload == payload
    assert messages[0].qos == 1
