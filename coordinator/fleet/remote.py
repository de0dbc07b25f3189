"""Ask a board something through its installer (device/installer.py) over ssh: the one way the host
talks to a flashed board (probe, receive, verify, configure, activate, stop, status).

The installer travels as source text on each call and runs with the board's own python and its
standard library; its answer is one JSON line, `{"ok": true, ...}` or `{"ok": false, "error": ...}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import IO

from edgeftl.coordinator.fleet.ssh import Ssh
from edgeftl.device import installer


class FlashError(RuntimeError):
    """This target cannot be flashed or asked; the message is the table's result line."""


def call_installer(ssh: Ssh, python: str, command: str, args: dict,
                   feed: Callable[[IO[bytes]], object] | None = None, timeout_s: float = 600,
                   required: bool = True, secret: bool = False) -> dict:
    """Run one installer command on the board; its answer.

    Args:
        feed: writes the command's input after the script (the tar stream of `receive`).
        required: raise on an `ok: false` answer (else return it).
        secret: the arguments hold credentials: they go on stdin, never on a command line.

    Raises:
        FlashError: the installer did not answer, or (with `required`) answered with an error.
        SshError: ssh itself failed.
    """
    script = installer.source()
    argv = installer.boot_argv(python, script, command, args, secret)

    def stdin(stream: IO[bytes]) -> None:
        stream.write(installer.boot_stdin(script, args, secret))
        if feed is not None:
            feed(stream)

    status, out, err = ssh.run(argv, stdin=stdin, timeout_s=timeout_s)
    lines = out.strip().splitlines()
    try:
        answer = dict(json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        raise FlashError(f"the installer ({command}) failed on the target: "
                         f"{last_line(err) or f'exit status {status}'}") from None
    if required and not answer.get("ok"):
        raise FlashError(answer.get("error") or f"{command} failed")
    return answer


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
