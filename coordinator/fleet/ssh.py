"""Reach a flash target over OpenSSH: parse `ssh://user@host[:port]/path`, run commands, name failures.

The system's `ssh` client does the work (keys, agents, `~/.ssh/config`, jump hosts all behave as
the user's own ssh does). Each target gets one master connection (ControlMaster), so a flash's
dozen commands pay for one handshake: under emulation or on a slow board that is seconds each.
Host keys are checked against `--known-hosts` (default: ssh's own file); a host seen for the
first time is accepted and remembered (`StrictHostKeyChecking=accept-new`), a changed key is refused.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, unquote, urlsplit

from edgeftl.device.protocol.topics import DEVICE_ID

TARGET_FORM = "ssh://user@host[:port]/absolute/path[?id=DEVICE_ID&data=/path/on/target]"
OPTIONS = ("id", "data")  # per-target settings in the URL's query


class TargetError(ValueError):
    """A target URL that cannot be used; the message names it and the accepted form."""


class SshError(RuntimeError):
    """ssh could not run a command on the target; the message says why in one line and what to do."""


@dataclass(frozen=True)
class Target:
    """One flash target: where to log in and the folder that holds the device's releases."""

    url: str
    host: str
    root: str  # absolute path on the target
    user: str | None = None
    port: int | None = None
    options: tuple[tuple[str, str], ...] = ()  # (id, ...), (data, ...) from the query

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def label(self) -> str:
        """How the target is shown in progress lines and the table: user@host:port/path."""
        port = f":{self.port}" if self.port else ""
        return f"{self.destination}{port}{self.root}"

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)


def parse_target(url: str) -> Target:
    """Parse `ssh://user@host[:port]/path[?id=...&data=...]`.

    Raises:
        TargetError: naming the URL and what is accepted.
    """
    parts = urlsplit(url)
    problem = None
    if parts.scheme != "ssh":
        problem = "the scheme must be ssh://"
    elif not parts.hostname:
        problem = "it names no host"
    elif not parts.path.startswith("/") or parts.path.rstrip("/") == "":
        problem = "the path must be an absolute folder other than / (e.g. /opt/edgeftl or /home/pi/edgeftl)"
    elif parts.password is not None:
        problem = "passwords do not belong in a target URL (use --identity KEY)"
    if problem is None:
        try:
            port = parts.port
        except ValueError:
            problem = "the port must be a number 1-65535"
    if problem is not None:
        raise TargetError(f"target {url!r}: {problem}; accepted: {TARGET_FORM}")
    options = tuple(parse_qsl(parts.query, keep_blank_values=True))
    for name, value in options:
        if name not in OPTIONS:
            raise TargetError(f"target {url!r}: unknown option {name!r}; accepted: {', '.join(OPTIONS)}")
        if name == "id" and not DEVICE_ID.fullmatch(value):
            raise TargetError(f"target {url!r}: device id {value!r} must be 1-64 of [A-Za-z0-9_.-], "
                              "starting with a letter or digit")
    root = unquote(parts.path).rstrip("/")
    return Target(url=url, host=parts.hostname or "", root=root, user=parts.username, port=port, options=options)


# ssh's exit status 255 means ssh itself failed; its last stderr line says why. Each known reason
# becomes a line that says what to do.
_FAILURES = [
    (re.compile(r"Connection refused"), "connection refused: is sshd running there and is the port right?"),
    (re.compile(r"timed out|No route to host|Network is unreachable"),
     "no answer (timed out or no route): is the board on and on this network?"),
    (re.compile(r"Could not resolve hostname|Name or service not known"), "unknown host name: check the spelling"),
    (re.compile(r"Permission denied \(publickey"),
     "ssh refused the key: add the public half of --identity to ~/.ssh/authorized_keys of that user there"),
    (re.compile(r"Permission denied"), "ssh refused the login: give --identity KEY of an authorized key"),
    (re.compile(r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED"),
     "the host key does not match the known one: if the board was reinstalled, remove its old key with "
     "ssh-keygen -R HOST (or fix --known-hosts)"),
]


def explain_ssh_failure(stderr: str, fallback: bool = True) -> str | None:
    """One line for ssh's own failure (exit status 255); None (without `fallback`) when stderr names none."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for pattern, reason in _FAILURES:
        if any(pattern.search(line) for line in lines):
            return reason
    return f"ssh failed: {lines[-1] if lines else 'no message'}" if fallback else None


class Ssh:
    """Commands on one target through one shared master connection; close() ends it."""

    def __init__(self, target: Target, identity: Path | None = None, known_hosts: Path | None = None,
                 connect_timeout_s: int = 10) -> None:
        self.target = target
        self._control = tempfile.mkdtemp(prefix="edgeftl-ssh-")
        options = ["BatchMode=yes", f"ConnectTimeout={connect_timeout_s}", "StrictHostKeyChecking=accept-new",
                   f"ControlPath={self._control}/m", "ServerAliveInterval=15", "ServerAliveCountMax=4",
                   "LogLevel=ERROR"]
        if known_hosts is not None:
            options.append(f"UserKnownHostsFile={known_hosts}")
        self._base = ["ssh", *(arg for option in options for arg in ("-o", option))]
        if identity is not None:
            self._base += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        if target.port is not None:
            self._base += ["-p", str(target.port)]

    def open(self, timeout_s: float = 60) -> None:
        """Log in once and keep the connection as the master every later command rides on.

        The master runs detached (`-f`) with its output in a file: a master that inherited our
        pipes would hold them open and every later read would hang until it exits. No `-M` beside
        ControlMaster=yes: the two together mean "ask", and a master that must ask refuses close()'s
        `-O exit` in batch mode (it then lingered for ControlPersist).

        Raises:
            SshError: the login failed (the reason in one line).
        """
        with tempfile.TemporaryFile() as errors:
            try:
                done = subprocess.run([*self._base, "-o", "ControlMaster=yes", "-o", "ControlPersist=300",
                                       "-N", "-f", self.target.destination], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=errors, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise SshError(f"no login within {timeout_s:.0f} s: is the board on and on this network?") from None
            if done.returncode != 0:
                errors.seek(0)
                raise SshError(explain_ssh_failure(errors.read().decode(errors="replace")) or "ssh failed")
        self._base += ["-o", "ControlMaster=no"]

    def argv(self, command: list[str]) -> list[str]:
        """The local argv that runs `command` (quoted for the remote shell) on the target."""
        return [*self._base, "--", self.target.destination, shlex.join(command)]

    def run(self, command: list[str] | str, stdin: Callable[[IO[bytes]], object] | None = None,
            timeout_s: float = 600) -> tuple[int, str, str]:
        """Run `command` there (a list is quoted for the remote shell, a string is shell text), with
        `stdin(stream)` writing its input from a thread; (exit status, stdout, stderr).

        Raises:
            SshError: ssh itself failed (unreachable, refused key, changed host key) or timed out.
        """
        argv = (self.argv(command) if isinstance(command, list)
                else [*self._base, "--", self.target.destination, command])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        feeder = threading.Thread(target=_feed, args=(proc, stdin), daemon=True)
        feeder.start()
        try:
            out, err = _collect(proc, timeout_s)
        finally:
            feeder.join(timeout=5)
        text_err = err.decode(errors="replace")
        # 255 is also what ssh exits with when the remote command died of a signal (the kernel's
        # OOM killer): only ssh's own reasons are connection failures.
        reason = explain_ssh_failure(text_err, fallback=False) if proc.returncode == 255 else None
        if reason is not None:
            raise SshError(reason)
        return proc.returncode, out.decode(errors="replace"), text_err

    def __enter__(self) -> Ssh:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except (OSError, subprocess.SubprocessError):  # a dead connection: nothing left to close
            pass

    def close(self) -> None:
        subprocess.run([*self._base, "-O", "exit", self.target.destination], capture_output=True, timeout=30)
        for leftover in Path(self._control).iterdir():
            leftover.unlink(missing_ok=True)
        Path(self._control).rmdir()


def _feed(proc: subprocess.Popen, write: Callable[[IO[bytes]], object] | None) -> None:
    """Write stdin from a thread (the reader drains stdout meanwhile); a target that stops reading ends it."""
    assert proc.stdin is not None
    try:
        if write is not None:
            write(proc.stdin)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def _collect(proc: subprocess.Popen, timeout_s: float) -> tuple[bytes, bytes]:
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SshError(f"the command did not finish within {timeout_s:.0f} s (ssh killed)") from None
    for reader in readers:
        reader.join(timeout=10)
    return b"".join(out), b"".join(err)
