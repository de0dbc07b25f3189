"""Flash a package onto boards over SSH: copy what changed, verify, check memory, start the agent.

Per target, in this order (docs/FLASHING.md):

    log in -> find the packaged Python -> probe (machine, memory, disk, current release)
    -> send only files the current release lacks -> the target verifies every file and renames
       the release into place (a target never holds a half-installed release)
    -> measure the memory plan there for --batch, refuse when it does not fit (unless --force)
    -> write the agent's config and credentials (0600) -> stop the old agent, switch `current`,
       start the service (systemd, else a supervised process), roll back if it dies at once

Targets run in parallel threads; each step prints one line, and a table ends the run. A target
that fails gets one line saying why and what to do; the others go on.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from edgeftl.coordinator.fleet.archive import Package
from edgeftl.coordinator.fleet.platforms import PLATFORMS, PYTHONS
from edgeftl.coordinator.fleet.remote import FlashError, call_installer, last_line
from edgeftl.coordinator.fleet.ssh import Ssh, SshError, Target
from edgeftl.device import service

Say = Callable[[str], None]
SERVICES = ("auto", "systemd", "supervised")
# Credentials a device may be given, as (flag of `edgeftl device run`, file name on the target,
# file name in an `edgeftl certs` device folder).
CREDENTIALS = (("--ca-file", "ca.crt", "ca.crt"), ("--cert", "client.crt", "client.crt"),
               ("--key", "client.key", "client.key"), ("--password-file", "password", "password"),
               ("--signing-key", "signing.pem", "signing.pem"))


@dataclass(frozen=True)
class FlashConfig:
    """What every target gets: broker, agent settings, credentials, and how to reach and check it."""

    broker: str
    prefix: str = "edgeftl"
    batch: int = 16
    seq: int | None = None  # tokens per example for the memory plan; default the bundle's max_seq_len
    micro_batch: int | None = None
    threads: int | None = None
    rounds: int | None = None  # the agent exits after this many rounds (default: serves forever)
    data: str = "{root}/data/train.csv"  # the device's training data, a path on the target
    identity: Path | None = None
    known_hosts: Path | None = None
    certs: Path | None = None  # an `edgeftl certs` folder: devices/<id>/ holds each device's files
    credentials: dict[str, Path] = field(default_factory=dict)  # flag -> local file, the same for all
    username: str | None = None
    insecure: bool = False
    force: bool = False
    service: str = "auto"
    parallel: int = 8
    settle_s: float = 8.0
    connect_timeout_s: int = 10

    def __post_init__(self) -> None:
        if self.service not in SERVICES:
            raise ValueError(f"--service {self.service!r} is not one of {', '.join(SERVICES)}")
        for name in ("batch", "parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("seq", "micro_batch", "threads", "rounds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        known = {flag for flag, _, _ in CREDENTIALS}
        for flag, path in self.credentials.items():
            if flag not in known:
                raise ValueError(f"unknown credential {flag}; accepted: {', '.join(sorted(known))}")
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if self.certs is not None and not (Path(self.certs) / "devices").is_dir():
            raise ValueError(f"--certs {self.certs}: no devices/ folder in it (make one with edgeftl certs)")


@dataclass
class FlashResult:
    """One row of the final table."""

    target: str
    device_id: str | None = None
    platform: str | None = None
    ok: bool = False
    result: str = ""
    free_mib: float | None = None
    planned_peak_mib: float | None = None
    copied_files: int = 0
    copied_bytes: int = 0
    seconds: float = 0.0


def flash(package: Package, targets: Sequence[Target], config: FlashConfig,
          say: Callable[[Target, str], None]) -> list[FlashResult]:
    """Flash `package` onto every target, `config.parallel` at a time; one result per target, in order."""
    with ThreadPoolExecutor(max_workers=min(config.parallel, max(1, len(targets)))) as pool:
        futures = [pool.submit(flash_one, package, target, config, _say_for(target, say)) for target in targets]
        return [future.result() for future in futures]


def _say_for(target: Target, say: Callable[[Target, str], None]) -> Say:
    return lambda line: say(target, line)


def flash_one(package: Package, target: Target, config: FlashConfig, say: Say) -> FlashResult:
    """Flash one target; never raises: a failure is the result's line."""
    began = time.monotonic()
    result = FlashResult(target=target.label, device_id=target.option("id"))
    try:
        with Ssh(target, config.identity, config.known_hosts, config.connect_timeout_s) as ssh:
            _Flash(package, target, config, ssh, result, say).run()
        result.ok = True
    except (FlashError, SshError, OSError) as exc:
        result.result = f"failed: {exc}"
    except Exception as exc:  # a bug must not stop the other targets: report it in this row
        result.result = f"failed (internal error, please report): {type(exc).__name__}: {exc}"
    finally:
        result.seconds = round(time.monotonic() - began, 1)
    say(result.result)
    return result


class _Flash:
    """The steps of one target's flash, sharing what earlier steps learned."""

    def __init__(self, package: Package, target: Target, config: FlashConfig, ssh: Ssh, result: FlashResult,
                 say: Say) -> None:
        self.package, self.target, self.config, self.ssh = package, target, config, ssh
        self.result, self.say = result, say
        self.manifest = package.manifest
        self.root = target.root
        self.data = (target.option("data") or config.data).replace("{root}", target.root)  # a path there
        self.python = ""

    def run(self) -> None:
        self.say("connecting")
        self.ssh.open(timeout_s=self.config.connect_timeout_s + 20)
        self.python, host = self._find_python()
        self.result.device_id = self.result.device_id or _device_id(host)
        probe = self._installer("probe", {"root": self.root})
        self._check(probe)
        copied = self._send(probe)
        peak = self._plan(probe)
        self._configure()
        started = self._installer("activate", {"root": self.root, "id": self.package.id, "service": self.config.service,
                                               "unit_name": unit_name(self.root), "settle_s": self.config.settle_s,
                                               "unit": service.render_unit(self.root, unit_name(self.root))},
                                  timeout_s=self.config.settle_s + 120)
        state = started.get("service") or {}
        fit = f"; plan {peak:.0f} of {self.result.free_mib:.0f} MiB free" if peak is not None else ""
        self.result.result = f"{copied}; started ({state.get('kind')}, pid {state.get('pid')}){fit}"

    # ---- steps -------------------------------------------------------------------------------

    def _find_python(self) -> tuple[str, str]:
        """The target's Python of the packaged version, and the target's host name."""
        want = self.manifest.python
        script = (f'for p in python{want} python3; do if command -v "$p" >/dev/null 2>&1; then '
                  "v=$(\"$p\" -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null) && "
                  'echo "python $(command -v "$p") $v"; fi; done; echo "host $(uname -n)"; echo "machine $(uname -m)"')
        _, out, _ = self.ssh.run(script, timeout_s=120)
        said = {}  # first word -> the rest, per line (a minimal image may lack uname: its line is then empty)
        found = []
        for line in out.splitlines():
            word, _, rest = line.strip().partition(" ")
            if word == "python" and len(rest.split()) == 2:
                found.append(rest.split())
            elif word in ("host", "machine"):
                said[word] = rest.strip()
        host, machine = said.get("host", ""), said.get("machine") or "?"
        self.result.platform = f"linux-{machine}" if machine != "?" else None
        chosen = next((path for path, version in found if version == want), None)
        if chosen is None:
            seen = ", ".join(f"{path} is {version}" for path, version in found) or "no python3 at all"
            other = sorted({version for _, version in found} & set(PYTHONS))
            hint = (f"install python{want} there, or package for it with --python {other[0]}" if other
                    else f"install python{want} there (Debian, Raspberry Pi OS: apt-get install python3)")
            raise FlashError(f"no Python {want} on the target ({seen}); {hint}")
        self.say(f"found {chosen} on {machine} host {host!r}")
        return chosen, host

    def _check(self, probe: dict) -> None:
        platform = PLATFORMS[self.manifest.platform]
        machine = probe.get("machine")
        self.result.platform = f"linux-{machine}"
        if machine != platform.machine:
            raise FlashError(f"the target is {machine}, the archive is for {self.manifest.platform}: "
                             f"package it with --platform linux-{machine}")
        service_rss = (probe.get("service") or {}).get("rss_mib") or 0.0
        free = probe.get("free_mib")
        self.result.free_mib = None if free is None else round(free + service_rss, 1)
        if not probe.get("writable"):
            raise FlashError(probe.get("writable_error") or f"cannot write to {self.root} on the target; "
                             "pick a writable path or fix its permissions")
        current = (probe.get("current") or {}).get("id")
        self.say(f"probe: {machine}, Python {probe.get('python')}, {self.result.free_mib} MiB free memory, "
                 f"{probe.get('disk_free_mib')} MiB free disk, current release {current}")

    def _send(self, probe: dict) -> str:
        """Copy what the target lacks; the target verifies every file. Returns the summary words."""
        current = probe.get("current") or {}
        have = set((current.get("files") or {}).values())
        reuse = current.get("id")
        if self.package.id in [current.get("id"), *(probe.get("releases") or [])]:
            # The current release, or one an earlier flash received but did not start (it refused)
            checked = self._installer("verify", {"root": self.root, "id": self.package.id}, required=False)
            if checked.get("ok"):
                self._check_data()
                self.say(f"release {self.package.id} already there, {checked.get('files')} files verified: "
                         "nothing to copy")
                return "unchanged, copied nothing"
            self.say(f"release {self.package.id} is there but damaged ({checked.get('error')}): repairing")
            reuse = self.package.id
            rotten = set(checked.get("bad") or self.manifest.files)  # the files that no longer match
            # A rotten file's content is sent for every path that holds it: the target links reused
            # files by sha256 and might otherwise pick the rotten copy.
            lost = {entry.sha256 for path, entry in self.manifest.files.items() if path in rotten}
            have = {entry.sha256 for entry in self.manifest.files.values()} - lost
        missing = [path for path, entry in sorted(self.manifest.files.items()) if entry.sha256 not in have]
        size = sum(self.manifest.files[path].size for path in missing)
        disk = probe.get("disk_free_mib")
        if disk is not None and size / 2**20 > disk:
            raise FlashError(f"target disk full at {self.root}: needs {size / 2**20:.1f} MiB, "
                             f"{disk:.1f} MiB free; free some space or flash to another path")
        self._check_data()  # before sending megabytes to a board whose agent could not start
        self.say(f"copying {len(missing)} of {len(self.manifest.files)} files ({size / 2**20:.1f} MiB)")
        received = self._installer(
            "receive", {"root": self.root, "id": self.package.id, "manifest": json.loads(self.manifest.to_json()),
                        "reuse_from": reuse},
            feed=lambda stream: self.package.write_tar(missing, stream), timeout_s=1800)
        self.result.copied_files = int(received.get("copied_files", 0))
        self.result.copied_bytes = int(received.get("copied_bytes", 0))
        self.say(f"release {self.package.id}: {received.get('verified_files')} files verified there "
                 f"({received.get('copied_files')} copied, {received.get('linked_files')} reused)")
        return f"copied {self.result.copied_files} files ({self.result.copied_bytes / 2**20:.1f} MiB)"

    def _check_data(self) -> None:
        if self.ssh.run(["test", "-r", self.data])[0] != 0:
            raise FlashError(f"no training data at {self.data} on the target: put the device's CSV or JSONL "
                             "there, or point --data (or the target's ?data=) at it")

    def _plan(self, probe: dict) -> float | None:
        """The agent's planned peak memory at --batch, measured there; refuse when it does not fit."""
        release = f"{self.root}/releases/{self.package.id}"
        seq = self.config.seq or bundle_max_seq_len(self.package)
        command = [f"{release}/bin/edgeftl", "device", "plan", "--bundle", f"{release}/bundle",
                   "--batch", str(self.config.batch), "--seq", str(seq), "--json"]
        free = self.result.free_mib
        for flag, value in (("--micro-batch", self.config.micro_batch), ("--threads", self.config.threads),
                            ("--max-memory-mib", free)):
            if value is not None:
                command += [flag, str(value)]
        self.say(f"measuring the memory plan there (batch {self.config.batch}, {seq} tokens)")
        status, out, err = self.ssh.run(command, timeout_s=1800)
        if status != 0:
            reason = last_line(err) or f"exit status {status}"
            return self._refuse(f"the memory plan failed on the target ({reason})", None)
        plan = json.loads(out.strip().splitlines()[-1])
        peak = float(plan["estimated_peak_mib"])
        self.result.planned_peak_mib = peak
        fitting = plan.get("largest_fitting_micro_batch") or 0
        hint = f"--micro-batch {fitting} is estimated to fit, or " if 0 < fitting < self.config.batch else ""
        if plan.get("probe_failed_at_micro_batch"):
            self.result.planned_peak_mib = None  # the estimate before the kill understates it: show none
            return self._refuse(f"a training step at micro-batch {plan['probe_failed_at_micro_batch']} was killed "
                                "there (out of memory)", peak, hint)
        if free is not None and peak > free:
            how = " (estimated from smaller micro-batches; not probed, to spare the board)" \
                if plan.get("probe_skipped_at_micro_batch") else ""
            return self._refuse(f"planned peak {peak:.0f} MiB at {self._batch_words()}{how} does not fit "
                                f"{free:.0f} MiB free", peak, hint)
        self.say(f"memory plan: peak {peak:.0f} MiB at {self._batch_words()}, {free} MiB free: fits")
        return peak

    def _batch_words(self) -> str:
        micro = self.config.micro_batch
        return f"batch {self.config.batch}" + (f" (micro-batch {micro})" if micro and micro < self.config.batch else "")

    def _refuse(self, why: str, peak: float | None, hint: str = "") -> float | None:
        if not self.config.force:
            raise FlashError(f"{why}; not started ({hint or 'lower --batch or set --micro-batch, or '}"
                             "--force to start anyway)")
        self.say(f"{why}; starting anyway (--force)")
        return peak

    def _configure(self) -> None:
        argv, files = agent_argv(self.root, self.result.device_id or "", self.config, self.package.id, self.data)
        self._installer("configure", {"root": self.root, "agent": {"argv": argv, "env": {}},
                                      "files": {name: base64.b64encode(data).decode() for name, data in files.items()}},
                        secret=True)

    def _installer(self, command: str, args: dict, feed: Callable[[IO[bytes]], object] | None = None,
                   timeout_s: float = 600, required: bool = True, secret: bool = False) -> dict:
        return call_installer(self.ssh, self.python, command, args, feed, timeout_s, required, secret)


def agent_argv(root: str, device_id: str, config: FlashConfig, package_id: str,
               data: str) -> tuple[list[str], dict[str, bytes]]:
    """The arguments the service gives `edgeftl device run`, and the credential files to write beside them.

    Credentials travel as files in <root>/config (0600) and the argv names their paths: never a
    secret on a command line, where any local user could read it in the process list.
    """
    argv = ["--broker", config.broker, "--bundle", f"{root}/current/bundle",
            "--data", data, "--id", device_id, "--prefix", config.prefix,
            "--state", f"{root}/state", "--package-id", package_id]
    for flag, value in (("--threads", config.threads), ("--micro-batch", config.micro_batch),
                        ("--rounds", config.rounds)):
        if value is not None:
            argv += [flag, str(value)]
    files: dict[str, bytes] = {}
    for flag, name, certs_name in CREDENTIALS:
        local = config.credentials.get(flag)
        if local is None and config.certs is not None:
            candidate = Path(config.certs) / "devices" / device_id / certs_name
            local = candidate if candidate.is_file() else None
        if local is not None:
            files[name] = Path(local).read_bytes()
            argv += [flag, f"{root}/config/{name}"]
    username = config.username or (device_id if config.certs is not None else None)
    if username:
        argv += ["--username", username]
    if config.insecure:
        argv.append("--insecure")
    return argv, files


def bundle_max_seq_len(package: Package) -> int:
    """The packaged bundle's max_seq_len (read from its manifest inside the archive)."""
    for _, _, _, reader in package.members(["bundle/manifest.json"]):
        return int(json.loads(reader.read())["max_seq_len"])
    raise FlashError("the package holds no bundle/manifest.json")


def unit_name(root: str) -> str:
    """The systemd unit of the install at `root`: edgeftl-<path as a name>, e.g. edgeftl-opt-edgeftl."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.strip("/")).strip("-") or "root"
    return f"edgeftl-{slug}"[:200]


def _device_id(host: str) -> str:
    """A device id from a host name: the characters an id accepts, else 'device'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", host.strip()).strip("-._")[:64]
    return cleaned or "device"


def table(results: Sequence[FlashResult]) -> str:
    """The final table: one row per target, then a count line."""
    # The result goes last: it is the long column, and a terminal wraps only the end of a row.
    rows = [("target", "device", "platform", "free MiB", "peak MiB", "copied", "s", "result")]
    for r in results:
        copied = f"{r.copied_files} / {r.copied_bytes / 2**20:.1f} MiB"
        rows.append((r.target, r.device_id or "-", r.platform or "-", _number(r.free_mib),
                     _number(r.planned_peak_mib), copied, f"{r.seconds:.1f}", ("ok: " if r.ok else "") + r.result))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    done = sum(r.ok for r in results)
    lines.append(f"{done} of {len(results)} targets flashed" + (f", {len(results) - done} failed" if done < len(results)
                                                                else ""))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
