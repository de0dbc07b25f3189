"""Transports: how devices and the coordinator exchange byte payloads through a broker.

`MqttTransport` talks to any MQTT 3.1.1/5 broker; `InProcessTransport` + `InProcessBroker`
give the same interface in one process for unit tests. Both chunk payloads above `max_chunk`
and reassemble them transparently (docs/PROTOCOL.md). `Topics` names the protocol's topics.
"""

from edgeftl.device.link.base import Callback, Transport, TransportError
from edgeftl.device.link.inprocess import InProcessBroker, InProcessTransport
from edgeftl.device.link.mqtt import MqttTransport, parse_url
from edgeftl.device.protocol.topics import Topics, topic_matches, validate_device_id

__all__ = [
    "Callback", "InProcessBroker", "InProcessTransport", "MqttTransport", "Topics", "Transport",
    "TransportError", "parse_url", "topic_matches", "validate_device_id",
]
