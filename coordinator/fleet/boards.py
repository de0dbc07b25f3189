"""`edgeftl fleet stop` and `edgeftl fleet logs`: ask flashed boards, over ssh, to stop their agent or
show its service state and log. Boards are asked in parallel; one that cannot be reached gets one line."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgeftl.coordinator.fleet.remote import FlashError, call_installer
from edgeftl.coordinator.fleet.ssh import Ssh, SshError, Target

# The installer needs only a Python 3.8+ standard library: any python3 the board has will do.
BOARD_PYTHON = "python3"


@dataclass
class BoardAnswer:
    """A board's answer to `stop` or `status`, or why there is none."""

    target: str
    ok: bool
    answer: dict = field(default_factory=dict)
    error: str = ""


def ask_boards(targets: Sequence[Target], command: str, identity: Path | None = None,
               known_hosts: Path | None = None, parallel: int = 8) -> list[BoardAnswer]:
    """Run the installer's `command` ("stop" or "status") on every board; answers in target order."""
    if command not in ("stop", "status"):
        raise ValueError(f"command {command!r}: accepted stop, status")
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets)))) as pool:
        return list(pool.map(lambda target: _ask(target, command, identity, known_hosts), targets))


def _ask(target: Target, command: str, identity: Path | None, known_hosts: Path | None) -> BoardAnswer:
    try:
        with Ssh(target, identity, known_hosts) as ssh:
            ssh.open()
            answer = call_installer(ssh, BOARD_PYTHON, command, {"root": target.root}, timeout_s=120)
        return BoardAnswer(target.label, True, answer)
    except (FlashError, SshError, OSError) as exc:
        return BoardAnswer(target.label, False, error=str(exc))


def describe(answer: BoardAnswer, command: str) -> list[str]:
    """The lines `edgeftl fleet stop|logs` prints for one board."""
    if not answer.ok:
        return [f"{answer.target}: failed: {answer.error}"]
    service = answer.answer.get("service") or {}
    if command == "stop":
        words = "stopped" if answer.answer.get("stopped") else "nothing was running"
        return [f"{answer.target}: {words}"]
    state = (f"running ({service.get('kind')}, pid {service.get('pid')}, agent pid {service.get('child_pid')}, "
             f"{service.get('restarts') or 0} restarts)" if service.get("running")
             else f"not running (last exit {service.get('last_exit')})")
    lines = [f"{answer.target}: release {answer.answer.get('id')}, {state}"]
    return lines + [f"  {line}" for line in answer.answer.get("log_tail") or []]
