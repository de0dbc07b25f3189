"""The live view: plain per-round lines off a terminal, a polled display on one."""

from __future__ import annotations

import io
import os
import pty
import select
import time

from edgeftl.coordinator.cli.coordinator import round_line
from edgeftl.coordinator.cli.live import LiveView, Progress, status_text
from edgeftl.coordinator.rounds.config import CoordinatorConfig
from edgeftl.coordinator.rounds.loop import Coordinator
from edgeftl.device.data import write_csv
from edgeftl.device.link import InProcessBroker
from edgeftl.device.protocol.manifest import read_manifest

from fixtures_build import bundle, coordinator_link, in_process_devices, keyword_dataset


def _record(round_index: int, accuracy: float) -> dict:
    return {"format": 1, "round": round_index, "devices_online": 3, "devices_selected": 3, "updates_received": 3,
            "updates_late": 0, "updates_rejected": 1, "bytes_up": 3 * 7000, "bytes_down": 3 * 110_000,
            "bytes_published": 220_000, "device_peak_rss_mib": 325.4, "wall_s": 6.5, "accuracy": accuracy,
            "loss": 1.5, "devices": {}}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_prints_exactly_the_plain_round_lines():
    # Prepare: a pipe-like stream (CI, `| tee`), two finished rounds
    stream = io.StringIO()
    records = [_record(0, 0.4), _record(1, 0.55)]
    # Execute
    with LiveView(rounds=2, deadline_s=300, line=round_line, stream=stream, refresh_s=0.01) as view:
        for record in records:
            view.on_round(record)
    # Assert: no control characters, no bars: the same lines `print(round_line(r))` gave
    assert not view.interactive
    assert stream.getvalue() == "".join(round_line(r) + "\n" for r in records)


def test_mode_follows_isatty_of_a_real_pipe_and_a_real_pty():
    read_fd, write_fd = os.pipe()
    master, slave = pty.openpty()
    with os.fdopen(write_fd, "w") as pipe, os.fdopen(slave, "w") as tty:
        assert LiveView(1, 10, round_line, stream=pipe).interactive is False
        assert LiveView(1, 10, round_line, stream=tty).interactive is True
    os.close(read_fd)
    os.close(master)


def test_a_pty_that_reports_no_size_still_gets_the_bars():
    # Prepare: a fresh pty is 0 x 0 (as under `script` or some CI runners); tqdm hides bars at 0 rows
    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w")
    # Execute
    with LiveView(rounds=2, deadline_s=30, line=round_line, stream=tty, refresh_s=0.01) as view:
        view.on_round(_record(0, 0.4))
        time.sleep(0.1)
    tty.close()
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    # Assert
    text = out.decode(errors="replace")
    assert "round 2/2 | accuracy 40.0%" in text and "deadline" in text


def test_terminal_without_coordinator_shows_counts_of_the_last_round():
    # Prepare
    stream = _Terminal()
    # Execute
    with LiveView(rounds=3, deadline_s=300, line=round_line, stream=stream, refresh_s=0.01) as view:
        view.on_round(_record(0, 0.4))
        progress = view.progress()
    # Assert: the finished round's line, and the status of the next round drawn under it
    out = stream.getvalue()
    assert round_line(_record(0, 0.4)) in out
    assert progress.round == 1 and progress.online == 3 and progress.accuracy == 0.4 and not progress.live
    assert progress.bytes_up == 21000 and progress.bytes_down == 220_000
    assert "round 2/3 | accuracy 40.0% | 3 online | last round 3/3, 0 late, 1 rejected" in out
    assert "deadline" in out


def test_status_text_names_every_counter():
    p = Progress(round=4, online=5, selected=5, received=3, late=1, rejected=2, bytes_up=3 * 2**20,
                 bytes_down=2048, accuracy=0.875, elapsed_s=12.0)
    assert status_text(p, 10) == ("round 5/10 | accuracy 87.5% | 5 online | updates 3/5, 1 late, 2 rejected | "
                                  "up 3.0 MiB, down 2.0 KiB")


def test_live_view_polls_a_real_coordinator_during_rounds(tmp_path, tmp_path_factory):
    # Prepare: an in-process federation of 2 devices on a tiny bundle, the view attached
    folder = bundle(tmp_path_factory, "bert-int8")
    files = []
    for i in range(2):
        texts, labels = keyword_dataset(32, seed=200 + i)
        files.append(write_csv(tmp_path / f"device{i}.csv", texts, labels))
    broker = InProcessBroker()
    agents, threads = in_process_devices(broker, folder, files, rounds=2, stop_after_s=60)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=2, steps=2, batch=8, deadline_s=60, codec="int8",
                               wait_devices=2, wait_devices_s=10)
    stream = _Terminal()
    view = LiveView(config.rounds, config.deadline_s, round_line, stream=stream, refresh_s=0.02)
    coordinator = Coordinator(coordinator_link(broker), folder, read_manifest(folder),
                              agents[0].runtime.get_flat(), config, on_round=view.on_round)
    view.attach(coordinator)
    for t in threads:
        t.start()
    # Execute
    coordinator.connect()
    assert coordinator.wait_for_devices() == 2
    with view:
        records = coordinator.run()
    for t in threads:
        t.join(timeout=30)
    # Assert: both round lines, the live status with the coordinator's own counters
    out = stream.getvalue()
    assert all(round_line(r) in out for r in records)
    assert "| 2 online |" in out and "deadline" in out
    progress = view.progress()
    assert progress.online == 2 and progress.round == 2
    assert progress.bytes_up >= sum(r["bytes_up"] for r in records)


def test_a_round_line_without_evaluation_names_no_loss() -> None:
    # Prepare: a round of a run without --eval (no accuracy, no held-out loss in its record)
    record = _record(0, 0.5)
    del record["accuracy"], record["loss"]

    # Execute
    line = round_line(record)

    # Assert: no "loss nan"; the evaluated round shows its loss
    assert "loss" not in line and "nan" not in line, line
    assert " loss 1.5000 " in round_line(_record(0, 0.5))
