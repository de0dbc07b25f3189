"""The systemd unit that runs a flashed device agent: the one home of its text.

The unit runs the supervisor in the foreground (`edgeftl device supervise --foreground`), so
`<root>/config/agent.json` stays the one source of the agent's argv whether systemd or the
supervised background process runs it, and both write the same run/status.json and log. systemd
restarts the supervisor if it crashes; the supervisor restarts the agent with backoff and ends
(with exit 0, so systemd leaves it) when the agent finishes with 0.

`edgeftl package` writes UNIT_TEMPLATE into the archive (service/edgeftl-device.service.in);
`edgeftl flash` renders it with `render_unit` and passes the text to the target's installer
(`activate` args "unit"), which cannot import edgeftl. Standard library only.
"""

from __future__ import annotations

import re

UNIT_TEMPLATE = """\
[Unit]
Description=edgeftl device agent (@NAME@)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart=@EXEC@ device supervise --root @ROOT_ARG@ --foreground
WorkingDirectory=@ROOT@
Restart=on-failure
RestartSec=5
TimeoutStopSec=15
NoNewPrivileges=true
# MemoryMax=2G  # uncomment to cap the agent's memory (systemd kills it above this)

[Install]
WantedBy=default.target
"""

_UNIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,99}$")


def render_unit(root: str, name: str = "edgeftl-device") -> str:
    """The unit text for an install at `root` (absolute path on the target).

    Args:
        root: the target's install folder, the path of ssh://user@host/path.
        name: the unit name (without .service), shown in its description.

    Raises:
        ValueError: a relative root, one with control characters, or a bad unit name.
    """
    if not root.startswith("/") or any(ord(ch) < 32 or ord(ch) == 127 for ch in root):
        raise ValueError(f"the target root must be an absolute path without control characters, got {root!r}")
    if not _UNIT_NAME.match(name):
        raise ValueError(f"unit name {name!r}: letters, digits, _ . @ - only")
    root = root.rstrip("/") or "/"
    escaped = root.replace("%", "%%")  # systemd expands %-specifiers in these settings
    executable = f"{root}/current/bin/edgeftl"
    return (UNIT_TEMPLATE.replace("@EXEC@", _quote(executable.replace("%", "%%")))
            .replace("@ROOT_ARG@", _quote(escaped)).replace("@ROOT@", escaped).replace("@NAME@", name))


def _quote(word: str) -> str:
    """A word of an ExecStart= line: double-quoted, C escapes, when it holds a space, quote or backslash."""
    if not any(ch in word for ch in ' \t"\'\\;$'):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'
