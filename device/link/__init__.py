"""The link: devices and the coordinator exchange typed messages through an MQTT broker.

`Link` sends and receives `edgeftl.device.protocol.messages` objects; it composes a connection
that moves frames (`MqttConnection` through any MQTT 3.1.1/5 broker, `InProcessConnection` +
`InProcessBroker` inside one process for unit tests) with a `Framer` that chunks large messages
and reassembles them (docs/PROTOCOL.md).
"""

from edgeftl.device.link.framing import Framer
from edgeftl.device.link.inprocess import InProcessBroker, InProcessConnection
from edgeftl.device.link.link import Connection, Incoming, Link, LinkError, Refused
from edgeftl.device.link.mqtt import MqttConnection, parse_url

__all__ = ["Connection", "Framer", "InProcessBroker", "InProcessConnection", "Incoming", "Link", "LinkError",
           "MqttConnection", "Refused", "parse_url"]
