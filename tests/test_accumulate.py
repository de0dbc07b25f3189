"""Streaming aggregation (coordinator/rounds/accumulate.py) against the list it replaces."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from edgeftl.coordinator.rounds.accumulate import KeptUpdates, StreamingMean
from edgeftl.coordinator.rounds.inbox import Inbox, ReceivedUpdate
from edgeftl.coordinator.rounds.privacy.mechanism import ClientDp
from edgeftl.coordinator.rounds.strategy import STRATEGIES, make_strategy
from edgeftl.coordinator.rounds.strategy.guard import clip_l2
from edgeftl.device.protocol.codecs import parse_codec
from edgeftl.device.protocol.messages import Update as UpdateMessage

SIZE = 64
STREAMING = ("fedavg", "fedadam", "fedyogi")


def _round(seed: int, count: int = 40) -> list[tuple[str, np.ndarray, float]]:
    """Synthetic updates: honest weights 10-60, norms 0.5-4, and a few outsized claims (first,
    middle, last) that the weight cap must bring down."""
    rng = np.random.default_rng(seed)
    updates = []
    for i in range(count):
        delta = (rng.normal(size=SIZE) * rng.uniform(0.1, 0.5)).astype(np.float32)
        weight = float(rng.integers(10, 60))
        if i in (0, count // 2, count - 1):
            weight = [10**6, 2**53 - 1, 5000][[0, count // 2, count - 1].index(i)]
        updates.append((f"dev-{i}", delta, float(weight)))
    return updates


def _both(updates, clip: float, ratio: float, private: bool) -> tuple[KeptUpdates, StreamingMean, list[str]]:
    kept = KeptUpdates()
    by_device = {device: delta for device, delta, _ in updates}
    reloaded: list[str] = []

    def reload(device: str) -> np.ndarray:
        reloaded.append(device)
        return by_device[device]

    streaming = StreamingMean(SIZE, clip, ratio, private, reload)
    for device, delta, weight in updates:
        kept.add(device, delta, weight)
        streaming.add(device, delta, weight)
    return kept, streaming, reloaded


@pytest.mark.parametrize("name", STREAMING)
@pytest.mark.parametrize("clip, ratio", [(0.0, 0.0), (0.0, 10.0), (1.5, 10.0), (1.5, 1.0)])
def test_streaming_matches_the_list_per_strategy_with_cap_and_clipping(name, clip, ratio):
    # Prepare: the same round through both paths, two rounds so FedAdam/FedYogi carry state
    g = np.random.default_rng(9).normal(size=SIZE).astype(np.float32)
    listed, streamed = make_strategy(name), make_strategy(name)
    assert streamed.streams_mean
    for seed in (1, 2):
        kept, streaming, reloaded = _both(_round(seed), clip, ratio, private=False)
        # Execute
        a = kept.close(clip, ratio, None, seed, 40, 100)
        b = streaming.close(clip, ratio, None, seed, 40, 100)
        new_listed = listed.aggregate(g, a.updates)
        new_streamed = streamed.aggregate(g, b.updates)
        # Assert: the same global to float tolerance, the same guard report, and only capped ones re-read
        np.testing.assert_allclose(new_streamed, new_listed, rtol=1e-6, atol=1e-7)
        assert b.guarded == a.guarded
        assert len(b.updates) == 1 and len(a.updates) == 40
        if ratio == 10:  # only outsized claims are read back (not one honest update)
            capped = {device for device, _, weight in _round(seed) if weight >= 5000}
            assert a.guarded["weights_capped"] == 3 and 0 < len(reloaded) and set(reloaded) <= capped
        elif ratio == 1:  # half the honest weights are capped too: still exact
            assert a.guarded["weights_capped"] >= 10
        else:
            assert reloaded == []
        assert (a.guarded["updates_clipped"] > 0) == (clip > 0)
    for key, value in listed.state().items():
        np.testing.assert_allclose(streamed.state()[key], value, rtol=1e-6, atol=1e-12)


def test_the_cap_uses_the_final_median_even_when_early_weights_mislead():
    # Prepare: small weights first (a low running median), then many large ones raise the median:
    # the early devices' added weights are right, but a mid-sized claim capped early is not
    deltas = [np.full(SIZE, float(i + 1), np.float32) for i in range(7)]
    weights = [1.0, 1.0, 15.0, 100.0, 100.0, 100.0, 100.0]  # final median 100, cap 200 at ratio 2
    updates = [(f"d{i}", d, w) for i, (d, w) in enumerate(zip(deltas, weights))]
    kept, streaming, reloaded = _both(updates, 0.0, 2.0, private=False)
    # Execute
    a, b = kept.close(0.0, 2.0, None, 0, 7, 7), streaming.close(0.0, 2.0, None, 0, 7, 7)
    # Assert: the plain weighted mean (no weight reaches 200); d2, d3 and d4 arrived while the median
    # so far was 1, 8 and 15, were added at 2, 16 and 30, and are read back; the rest were added whole
    expected = sum(w * d.astype(np.float64) for d, w in zip(deltas, weights)) / sum(weights)
    np.testing.assert_allclose(b.updates[0].delta, expected, rtol=1e-6)
    listed = make_strategy("fedavg").aggregate(np.zeros(SIZE, np.float32), a.updates)
    np.testing.assert_allclose(b.updates[0].delta, listed, rtol=1e-6)
    assert reloaded == ["d2", "d3", "d4"] and a.guarded["weights_capped"] == b.guarded["weights_capped"] == 0


@pytest.mark.parametrize("name", ("fedavg", "fedadam", "fedyogi"))
def test_streaming_dp_draws_the_same_noise_and_spends_the_same_budget(name):
    # Prepare: DP with a fixed seed; weights (including absurd ones) are ignored by the mechanism
    updates = _round(3)
    kept, streaming, reloaded = _both(updates, 1.0, 10.0, private=True)
    dp_list, dp_stream = ClientDp(1.0, 0.8, 1e-5, seed=7), ClientDp(1.0, 0.8, 1e-5, seed=7)
    # Execute
    a = kept.close(1.0, 10.0, dp_list, 4, 50, 1000)
    b = streaming.close(1.0, 10.0, dp_stream, 4, 50, 1000)
    g = np.zeros(SIZE, np.float32)
    # Assert
    np.testing.assert_allclose(b.updates[0].delta, a.updates[0].delta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(make_strategy(name).aggregate(g, b.updates),
                               make_strategy(name).aggregate(g, a.updates), rtol=1e-6, atol=1e-8)
    assert b.guarded == a.guarded and reloaded == []
    assert dp_stream.record() == dp_list.record()


def test_robust_strategies_and_lora_keep_the_list_and_say_so():
    streaming = {name for name in STRATEGIES if _build(name).streams_mean}
    assert streaming == set(STREAMING)


def _build(name: str):
    from edgeftl.device.protocol.manifest import LoraFactor, TrainableParam

    trainable = [TrainableParam("l.a", [2, 3], "float32", 0, LoraFactor("l", "A")),
                 TrainableParam("l.b", [4, 2], "float32", 6, LoraFactor("l", "B"))]
    return make_strategy(name, trainable, byzantine=1)


def test_streaming_refuses_what_the_list_refuses():
    streaming = StreamingMean(SIZE, 0.0, 10.0, False, lambda d: np.zeros(SIZE, np.float32))
    with pytest.raises(ValueError, match="zero updates"):
        streaming.close(0.0, 10.0, None, 0, 1, 1)
    with pytest.raises(ValueError, match="positive and finite"):
        streaming.add("d", np.zeros(SIZE, np.float32), 0.0)
    with pytest.raises(ValueError, match="guard settings"):
        streaming.close(1.0, 10.0, None, 0, 1, 1)


def _feed(gather, count: int, size: int) -> int:
    """`count` int8-encoded updates through a real inbox into `gather`; the tracemalloc peak."""
    inbox = Inbox("run", "a" * 64, size)
    inbox.open_round(0, [f"dev-{i}" for i in range(count)])
    codec = parse_codec("int8")
    tracemalloc.start()
    try:
        for i in range(count):  # each update exists only while it is taken, as from the link
            delta = np.random.default_rng(i).normal(size=size).astype(np.float32)
            message = UpdateMessage("run", 0, "a" * 64, f"dev-{i}", 32, 0, codec.encode(delta))
            taken = inbox.take(message, size)
            assert isinstance(taken, ReceivedUpdate)
            gather.add(f"dev-{i}", taken.delta, 32.0)
            del delta, message, taken
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_memory_stays_at_a_few_vectors_while_the_list_grows():
    # Prepare: 500 updates of 20,000 parameters (80 KB each as float32)
    size, count = 20_000, 500
    vector_bytes = 4 * size
    # Execute
    streamed = _feed(StreamingMean(size, 1.0, 10.0, False, lambda d: np.zeros(size, np.float32)), count, size)
    listed = _feed(KeptUpdates(), count, size)
    # Assert: the running float64 sum (2 vectors) plus one update in flight (encoded, decoded, clipped,
    # as float64) and the test's own float64 draw, against every decoded update kept
    assert streamed < 10 * vector_bytes, f"streaming peak {streamed} B for a {vector_bytes} B vector"
    assert listed > count * vector_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from fixtures_build import bundle

    return bundle(tmp_path_factory, "bert-int8")


def test_the_round_loop_streams_and_rereads_a_capped_update_from_its_journal(tiny, tmp_path):
    # Prepare: four devices through an in-process broker; the first to reply claims 1000 samples
    from edgeftl.coordinator.rounds.config import CoordinatorConfig
    from edgeftl.coordinator.rounds.loop import Coordinator
    from edgeftl.device.link import InProcessBroker
    from edgeftl.device.protocol.codecs import Encoded
    from edgeftl.device.protocol.manifest import read_manifest
    from edgeftl.device.protocol.messages import Task
    from edgeftl.device.runtime import trainable_vector

    from fixtures_build import coordinator_link, device_link

    broker = InProcessBroker()
    manifest = read_manifest(tiny)
    initial = trainable_vector(tiny, manifest)
    config = CoordinatorConfig(out=tmp_path / "run", rounds=1, deadline_s=60, wait_devices=4, wait_devices_s=20,
                               run_id="r1", max_weight_ratio=2.0, clip_norm=5.0)
    coordinator = Coordinator(coordinator_link(broker), tiny, manifest, initial, config)
    devices = [device_link(broker, f"dev{i}") for i in range(4)]
    for link in devices:
        link.connect()
    coordinator.connect()
    assert coordinator.wait_for_devices() == 4 and isinstance(coordinator._gathering(), StreamingMean)
    reads: list[str] = []
    reload = coordinator._reload
    coordinator._reload = lambda device: reads.append(device) or reload(device)  # type: ignore[method-assign]
    records: list[dict] = []
    runner = threading.Thread(target=lambda: records.extend(coordinator.run()), daemon=True)
    runner.start()
    rng = np.random.default_rng(4)
    deltas = [(rng.normal(size=initial.size) * 0.01).astype(np.float32) for _ in devices]
    deltas[3] *= 1000  # beyond the clip norm too
    samples = [10, 10, 10, 1000]
    # Execute: each device waits for the task and replies, the inflated claim first
    for i in (3, 0, 1, 2):
        task = _task_for(devices[i], Task)
        vector = Encoded("none", initial.size, {"values": deltas[i]})
        devices[i].send(UpdateMessage("r1", task.round, task.bundle_sha256, f"dev{i}", samples[i], 0, vector))
    runner.join(timeout=60)
    # Assert: the list-based FedAvg of the clipped deltas with the capped weight (2 x median 10)
    clipped = [clip_l2(d, 5.0)[0].astype(np.float64) for d in deltas]
    weights = [10, 10, 10, 20]
    expected = initial + (sum(w * d for w, d in zip(weights, clipped)) / sum(weights)).astype(np.float32)
    np.testing.assert_allclose(coordinator.params, expected, rtol=1e-5, atol=1e-6)
    record = records[0]
    assert (record["weights_capped"], record["updates_clipped"], record["updates_received"]) == (1, 1, 4)
    assert record["sample_mode"] == "uniform" and record["aggregated"] and reads == ["dev3"]


def _task_for(link, task_type):
    for _ in range(200):
        item = link.receive(timeout_s=0.1)
        if item is not None and isinstance(getattr(item, "message", None), task_type):
            return item.message
    raise AssertionError("no task within 20 s")
