"""`edgeftl fleet status`: the devices a broker has seen (id, platform, bundle, runtime versions,
package, last round, peak memory, online/offline/lost), read from their retained statuses. It only
subscribes: nothing is published, so looking never changes what the coordinator sees."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from edgeftl.coordinator.cli.flash import add_target_flags, targets_of
from edgeftl.device.cli.common import add_security_flags, fail

MAX_WAIT_S = 600.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="list the devices seen on a broker, from their retained statuses",
                            description=__doc__)
    status.add_argument("--broker", required=True, help="mqtt://host:port, or mqtts://host:port for TLS")
    status.add_argument("--prefix", default="edgeftl", help="the federation's MQTT topic prefix")
    status.add_argument("--wait-s", type=float, default=2.0,
                        help="seconds to collect statuses once subscribed (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    status.add_argument("--allowlist", type=Path, default=None,
                        help="allowlist.json of `edgeftl certs`: list only statuses signed by these devices "
                             "(others are reported as refused)")
    add_security_flags(status)
    for name, text in (("stop", "stop the agent on flashed boards (over ssh)"),
                       ("logs", "show the agent's service state and the end of its log on flashed boards (over ssh)")):
        add_target_flags(sub.add_parser(name, help=text, description=text))


def run(args: argparse.Namespace) -> int:
    if args.fleet_command in ("stop", "logs"):
        return _boards(args)
    from edgeftl.coordinator.fleet.status import as_json, read_statuses, reader_client_id, rows_of, table
    from edgeftl.device.cli.common import security_from
    from edgeftl.device.link import LinkError, MqttConnection
    from edgeftl.device.protocol.auth import Keys, read_allowlist

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")
    if not (math.isfinite(args.wait_s) and 0 < args.wait_s <= MAX_WAIT_S):
        return fail(f"--wait-s must be > 0 and <= {MAX_WAIT_S:g} seconds, got {args.wait_s:g}")
    try:
        keys = Keys(None, read_allowlist(args.allowlist)) if args.allowlist else None
        connection = MqttConnection(args.broker, reader_client_id(), clean_start=True, security=security_from(args))
        statuses, refused = read_statuses(connection, args.prefix, args.wait_s, keys)
    except (ValueError, OSError, LinkError) as exc:
        return fail(str(exc))
    rows = rows_of(statuses)
    if args.json:
        print(json.dumps(as_json(rows, refused), indent=1, sort_keys=True))
        return 0
    print(table(rows))
    for item in refused:
        print(f"refused a status on {item.topic}: {item.reason}", file=sys.stderr)
    return 0


def _boards(args: argparse.Namespace) -> int:
    from edgeftl.coordinator.fleet.boards import ask_boards, describe

    command = {"stop": "stop", "logs": "status"}[args.fleet_command]
    try:
        answers = ask_boards(targets_of(args), command, args.identity, args.known_hosts, args.parallel)
    except ValueError as exc:
        return fail(str(exc))
    for answer in answers:
        print("\n".join(describe(answer, command)))
    return 0 if all(answer.ok for answer in answers) else 1
