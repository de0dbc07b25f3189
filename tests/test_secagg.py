"""Secure aggregation as pure state machines, driven in-process: sums, dropouts, secrecy, refusals."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgeftl.device.secagg import SecAggError, crypto, shamir
from edgeftl.device.secagg.client import SecAggClient
from edgeftl.device.secagg.fixedpoint import FixedPoint
from edgeftl.device.secagg.messages import Ciphertexts, Masked, Roster, Unmask, from_payload, to_payload
from edgeftl.device.secagg.prg import prg_uint32
from edgeftl.device.secagg.server import SecAggServer

CTX = crypto.context("run-1", 3, "ab" * 32)


def wire(stage):
    """Every stage crosses its byte form, as it would over the link."""
    return from_payload(*to_payload(stage))


class Round:
    """An in-process driver: devices and the server exchange every stage through its bytes."""

    def __init__(self, ids: list[str], size: int, fixed: FixedPoint | None = None) -> None:
        self.ids, self.size = ids, size
        self.clients = {d: SecAggClient(d, CTX) for d in ids}
        self.server = SecAggServer(CTX, ids, size, fixed or FixedPoint(max_devices=16))

    def run(self, updates: dict[str, np.ndarray], weights: dict[str, int], skip_advertise=(), skip_share=(),
            skip_masked=(), skip_unmask=()) -> tuple[np.ndarray, int]:
        s, c = self.server, self.clients
        for d in self.ids:
            if d not in skip_advertise:
                s.advertise(d, wire(c[d].advertise()))
        for d, roster in s.roster().items():
            shares = wire(c[d].share(wire(roster)))
            if d not in skip_share:
                s.share(d, shares)
        for d, boxes in s.ciphertexts().items():
            c[d].receive(wire(boxes))
            if d not in skip_masked:
                s.masked(d, wire(c[d].mask(updates[d], weights[d])))
        for d, survivors in s.survivors().items():
            if d not in skip_unmask:
                s.unmask(d, wire(c[d].unmask(wire(survivors))))
        return s.aggregate()


def test_prg_is_the_chacha20_keystream_of_rfc_8439():
    # RFC 8439 / RFC 7539 appendix A.1 test vector 1: key and nonce zero, counter 0, keystream 76 b8 e0 ad a0 f1 3d 90
    assert prg_uint32(bytes(32), 2).tolist() == [0xADE0B876, 0x903DF1A0]


def test_three_devices_sum_to_the_hand_computed_weighted_mean():
    # Prepare: weights 1, 3 and 4; the third value of device c is clipped to 1
    updates = {"a": np.array([0.5, -0.25, 0.0], np.float32), "b": np.array([0.1, 0.3, 0.2], np.float32),
               "c": np.array([0.0, 0.0, 5.0], np.float32)}
    weights = {"a": 1, "b": 3, "c": 4}
    # Execute
    mean, weight = Round(list(updates), 3).run(updates, weights)
    # Assert: ((0.5 + 0.3 + 0) / 8, (-0.25 + 0.9 + 0) / 8, (0 + 0.6 + 4 * 1.0) / 8)
    assert weight == 8
    np.testing.assert_allclose(mean, [0.1, 0.08125, 0.575], atol=1e-6)


def test_aggregate_is_the_weighted_mean_of_the_survivors_despite_dropouts():
    # Prepare: 9 sampled devices; dev8 never advertises, dev7 drops after sharing keys (before masking),
    # dev5 and dev6 drop after sending their masked vectors (they never answer the unmasking)
    ids = [f"dev{i}" for i in range(9)]
    rng = np.random.default_rng(1)
    updates = {d: rng.normal(0, 0.02, 5000).astype(np.float32) for d in ids}
    weights = {d: int(rng.integers(1, 200)) for d in ids}
    sa = Round(ids, 5000)
    # Execute
    mean, weight = sa.run(updates, weights, skip_advertise={"dev8"}, skip_masked={"dev7"},
                          skip_unmask={"dev5", "dev6"})
    # Assert: the mean covers every device whose masked vector arrived (dev0-dev6), up to quantization
    survivors = [f"dev{i}" for i in range(7)]
    assert sorted(sa.server.inputs) == survivors and sorted(sa.server.unmasks) == survivors[:5]
    expected = sum(weights[d] * updates[d].astype(np.float64) for d in survivors) / sum(weights[d] for d in survivors)
    assert weight == sum(weights[d] for d in survivors)
    bound = sa.server.fixed.max_error(len(survivors), weight) + 1e-9  # + float32 rounding of the result
    assert 0 < np.abs(mean - expected).max() <= bound
    assert np.abs(expected).max() > 1000 * bound  # the error is small against the values


def test_a_masked_update_is_uncorrelated_with_the_update():
    # Prepare: a strongly structured update (what a head-bias sign would reveal): positive and large
    ids = ["a", "b", "c"]
    update = np.abs(np.random.default_rng(2).normal(0.1, 0.05, 20_000)).astype(np.float32)
    sa = Round(ids, update.size)
    for d in ids:
        sa.server.advertise(d, sa.clients[d].advertise())
    for d, roster in sa.server.roster().items():
        sa.server.share(d, sa.clients[d].share(roster))
    for d, boxes in sa.server.ciphertexts().items():
        sa.clients[d].receive(boxes)
    # Execute
    masked = sa.clients["a"].mask(update, 10).vector[:-1]
    plain = sa.server.fixed.encode(update, 10)[:-1]
    # Assert: the plain encoding is the update (r = 1); the masked one looks like uniform noise
    assert np.corrcoef(plain.view(np.int32), update)[0, 1] > 0.999
    r = np.corrcoef(masked.view(np.int32).astype(np.float64), update)[0, 1]
    assert abs(r) < 4 / np.sqrt(update.size), r
    counts, _ = np.histogram(masked, bins=16, range=(0, 2**32))
    chi2 = (((counts - update.size / 16) ** 2) / (update.size / 16)).sum()
    assert chi2 < 37.7, counts  # the 99.9% quantile of chi-square with 15 degrees of freedom


def test_fewer_than_threshold_shares_reveal_nothing_and_are_refused():
    # Prepare: a secret split 3-of-5
    secret = hashlib.sha256(b"s").digest()
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    two = {x: shares[x] for x in (2, 5)}
    # Execute / Assert: any 3 recover it; 2 are refused, and interpolating them gives something else
    assert shamir.reconstruct({x: shares[x] for x in (1, 3, 4)}, 3) == secret
    with pytest.raises(SecAggError, match="too few shares: 2, the threshold is 3"):
        shamir.reconstruct(two, 3)
    assert shamir.interpolate_at_zero(two) != int.from_bytes(secret, "big")
    # t - 1 shares are consistent with every secret: a degree-2 polynomial through (0, other) and the two
    other = int.from_bytes(hashlib.sha256(b"other").digest(), "big")
    poly = {0: other, **two}
    assert all(shamir.interpolate_at_zero({**{k: v for k, v in poly.items() if k != x}, x: poly[x]}) == other
               for x in two)


def test_fewer_than_threshold_unmask_replies_cannot_unmask():
    ids = ["a", "b", "c", "d", "e"]  # threshold 3
    updates = {d: np.zeros(8, np.float32) for d in ids}
    with pytest.raises(SecAggError, match="too few devices: 2 unmask replies, the threshold is 3"):
        Round(ids, 8).run(updates, dict.fromkeys(ids, 1), skip_unmask={"a", "b", "c"})


def _ready(ids: list[str], size: int = 4) -> Round:
    """A round after stage 1: every device holds its ciphertexts."""
    sa = Round(ids, size)
    for d in ids:
        sa.server.advertise(d, sa.clients[d].advertise())
    rosters = sa.server.roster()
    for d in ids:
        sa.server.share(d, sa.clients[d].share(rosters[d]))
    for d, boxes in sa.server.ciphertexts().items():
        sa.clients[d].receive(boxes)
    return sa


@pytest.mark.parametrize(("name", "payload", "masked", "reason"), [
    ("advertise", b"not json", None, "bad payload: stage 'advertise' is not a UTF-8 JSON object"),
    ("advertise", b'{"c_pk": "00", "s_pk": "00", "b_commit": "00"}', None, "bad field: advertise c_pk"),
    ("advertise", b"[]", None, "bad payload: stage 'advertise' is not a JSON object"),
    ("unmask", b'{"b_shares": {"a": "zz"}, "s_shares": {}}', None, "expected 33 bytes as lowercase hex"),
    ("survivors", b'{"devices": ["a", "a"]}', None, "distinct device ids"),
    ("survivors", b'{}', None, "bad field: survivors lacks field 'devices'"),
    ("masked", b"{}", np.zeros(3, np.float32), "bad array: the masked vector must be 1-D uint32"),
    ("masked", b"{}", None, "bad array: stage 'masked' lacks a masked vector"),
    ("share", b"{}", np.zeros(3, np.uint32), "bad array: stage 'share' carries a masked vector"),
    ("unknown", b"{}", None, "bad stage: 'unknown'"),
])
def test_malformed_payloads_are_refused_with_one_line(name, payload, masked, reason):
    with pytest.raises(SecAggError, match=reason) as caught:
        from_payload(name, payload, masked)
    assert "\n" not in str(caught.value)


def _shared(ids: list[str]) -> tuple[Round, dict[str, Ciphertexts]]:
    """A round whose stage 1 is closed; the ciphertexts are not delivered yet."""
    sa = Round(ids, 4)
    for d in ids:
        sa.server.advertise(d, sa.clients[d].advertise())
    rosters = sa.server.roster()
    for d in ids:
        sa.server.share(d, sa.clients[d].share(rosters[d]))
    return sa, sa.server.ciphertexts()


def test_a_tampered_ciphertext_is_refused_and_ends_the_devices_round():
    sa, boxes = _shared(["a", "b", "c"])
    sealed = dict(boxes["a"].sealed)
    sealed["b"] = sealed["b"][:-1] + bytes([sealed["b"][-1] ^ 1])
    with pytest.raises(SecAggError, match="bad ciphertext: authentication failed"):
        sa.clients["a"].receive(Ciphertexts(sealed))
    with pytest.raises(SecAggError, match="wrong stage: mask while this device expects failed"):
        sa.clients["a"].mask(np.zeros(4, np.float32), 1)


def test_a_ciphertext_for_another_device_is_refused():
    sa, boxes = _shared(["a", "b", "c"])
    misrouted = Ciphertexts({"a": boxes["c"].sealed["a"], "c": boxes["b"].sealed["c"]})  # a's box for c, given to b
    with pytest.raises(SecAggError, match="bad ciphertext: authentication failed"):
        sa.clients["b"].receive(misrouted)
    sa, boxes = _shared(["a", "b", "c"])
    with pytest.raises(SecAggError, match="bad ciphertext: 20 bytes, shorter than nonce and tag"):
        sa.clients["b"].receive(Ciphertexts({"a": boxes["b"].sealed["a"][:20], "c": boxes["b"].sealed["c"]}))


def test_the_server_refuses_wrong_lengths_repeats_and_strangers():
    sa = _ready(["a", "b", "c"])
    with pytest.raises(SecAggError, match=r"wrong size: 'a' sent \(3,\) uint32, expected \(5,\) uint32"):
        sa.server.masked("a", Masked(np.zeros(3, np.uint32)))
    sa.server.masked("a", sa.clients["a"].mask(np.zeros(4, np.float32), 1))
    with pytest.raises(SecAggError, match="second reply: 'a' already sent its masked"):
        sa.server.masked("a", Masked(np.zeros(5, np.uint32)))
    with pytest.raises(SecAggError, match="unknown device: 'x'"):
        sa.server.masked("x", Masked(np.zeros(5, np.uint32)))
    with pytest.raises(SecAggError, match="wrong stage: advertise from 'a' while the round is at masked"):
        sa.server.advertise("a", sa.clients["a"].advertised())


def test_unmask_replies_must_name_each_device_in_exactly_one_set():
    # Prepare: c drops before masking, so the unmasking needs b of a, b, d and s_sk of c
    sa = _ready(["a", "b", "c", "d"])
    for d in ("a", "b", "d"):
        sa.server.masked(d, sa.clients[d].mask(np.zeros(4, np.float32), 1))
    lists = sa.server.survivors()
    honest = sa.clients["a"].unmask(lists["a"])
    both = Unmask(honest.b_shares, {**honest.s_shares, "b": honest.b_shares["b"]})
    with pytest.raises(SecAggError, match=r"a device in two sets: 'a' sent both secrets' shares of \['b'\]"):
        sa.server.unmask("a", both)
    with pytest.raises(SecAggError, match="bad unmask: 'a' must send b shares of exactly the 3 survivors"):
        sa.server.unmask("a", Unmask({"a": honest.b_shares["a"]}, honest.s_shares))
    with pytest.raises(SecAggError, match="bad share: 32 bytes, expected 33"):
        sa.server.unmask("a", Unmask({**honest.b_shares, "a": bytes(32)}, honest.s_shares))


def test_a_tampered_share_is_outvoted_when_more_than_threshold_replied():
    # Prepare: 5 devices (threshold 3), all 5 answer the unmasking, one of them with a wrong share of b
    ids = ["a", "b", "c", "d", "e"]
    sa = _ready(ids)
    for d in ids:
        sa.server.masked(d, sa.clients[d].mask(np.full(4, 0.25, np.float32), 2))
    lists = sa.server.survivors()
    for d in ids:
        reply = sa.clients[d].unmask(lists[d])
        if d == "a":
            wrong = shamir.share_bytes((shamir.share_value(reply.b_shares["c"]) + 1) % shamir.PRIME)
            reply = Unmask({**reply.b_shares, "c": wrong}, reply.s_shares)
        sa.server.unmask(d, reply)
    # Execute / Assert: the reconstruction that matches c's commitment is found
    mean, weight = sa.server.aggregate()
    assert weight == 10
    np.testing.assert_allclose(mean, 0.25, atol=1e-6)


def test_only_tampered_shares_at_threshold_fail_loudly():
    ids = ["a", "b", "c"]  # threshold 2
    sa = _ready(ids)
    for d in ids:
        sa.server.masked(d, sa.clients[d].mask(np.zeros(4, np.float32), 1))
    lists = sa.server.survivors()
    for d in ("a", "b"):
        reply = sa.clients[d].unmask(lists[d])
        if d == "a":
            reply = Unmask({**reply.b_shares, "c": shamir.share_bytes(12345)}, reply.s_shares)
        sa.server.unmask(d, reply)
    with pytest.raises(SecAggError, match="bad shares: no 2 of the 2 shares of 'c'"):
        sa.server.aggregate()


def test_a_device_refuses_a_roster_that_would_weaken_it():
    sa = Round(["a", "b", "c", "d"], 4)
    for d in sa.ids:
        sa.server.advertise(d, sa.clients[d].advertise())
    roster = sa.server.roster()["a"]
    low = Roster(type(roster.params)(1, 4, roster.params.fixed), roster.members)
    with pytest.raises(SecAggError, match="bad roster: threshold 1 for 4 devices; accepted: a majority"):
        sa.clients["a"].share(low)
    sa.clients["a"].next = "share"  # (a fresh attempt at the same stage, to test the next forgery)
    # the coordinator swaps in keys of its own for device a (what a man in the middle would do): a notices,
    # the others cannot (docs/SECAGG.md section 8); a roster giving two members one key is refused by all
    mitm = SecAggClient("a", CTX).advertised()
    forged = Roster(roster.params, (type(roster.members[0])("a", mitm), *roster.members[1:]))
    with pytest.raises(SecAggError, match="bad roster: this device is missing or listed with keys it did not"):
        sa.clients["a"].share(forged)
    cloned = Roster(roster.params, (type(roster.members[0])("a", roster.members[1].keys), *roster.members[1:]))
    with pytest.raises(SecAggError, match="bad roster: two members share an id or a public key"):
        sa.clients["b"].share(cloned)
    with pytest.raises(SecAggError, match="bad roster: this device is missing"):
        sa.clients["c"].share(Roster(roster.params, tuple(m for m in roster.members if m.device_id != "c")))


def test_a_device_never_answers_a_stage_twice():
    sa = _ready(["a", "b", "c"])
    with pytest.raises(SecAggError, match="wrong stage: receive while this device expects mask"):
        sa.clients["a"].receive(Ciphertexts({}))
    masked = sa.clients["a"].mask(np.zeros(4, np.float32), 1)
    assert isinstance(masked, Masked)
    with pytest.raises(SecAggError, match="wrong stage: mask while this device expects unmask"):
        sa.clients["a"].mask(np.zeros(4, np.float32), 1)


def test_signed_keys_stop_a_coordinator_that_swaps_a_devices_keys():
    # Prepare: each device signs its advertisement with an Ed25519 identity key the others know (the auth allowlist)
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ids = ["a", "b", "c"]
    identity = {d: Ed25519PrivateKey.generate() for d in ids}

    def verify(device: str, data: bytes, signature: bytes) -> bool:
        try:
            identity[device].public_key().verify(signature, data)
        except InvalidSignature:
            return False
        return True

    clients = {d: SecAggClient(d, CTX, identity[d].sign, verify) for d in ids}
    server = SecAggServer(CTX, ids, 4, FixedPoint(max_devices=4))
    for d in ids:
        server.advertise(d, wire(clients[d].advertise()))
    roster = wire(server.roster()["b"])
    # Execute / Assert: the honest roster passes; with a's keys replaced by the coordinator's own, b refuses
    assert len(wire(clients["a"].share(roster)).sealed) == 2
    mitm = SecAggClient("a", CTX, Ed25519PrivateKey.generate().sign).advertised()  # signed, by the wrong key
    forged = Roster(roster.params, (type(roster.members[0])("a", mitm), *roster.members[1:]))
    with pytest.raises(SecAggError, match="bad roster: the keys of 'a' are not signed by its device key"):
        clients["b"].share(forged)
    unsigned = SecAggClient("a", CTX).advertised()
    with pytest.raises(SecAggError, match="bad roster: the keys of 'a' are not signed"):
        clients["c"].share(Roster(roster.params, (type(roster.members[0])("a", unsigned), *roster.members[1:])))


def test_the_conformance_vectors_are_current_and_hold():
    # Prepare: the committed vectors, and what the code makes now
    import json
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parent.parent / "tools"
    sys.path.insert(0, str(tools))
    import make_secagg_vectors

    text = make_secagg_vectors.OUT.read_text(encoding="utf-8")
    v = json.loads(text)
    # Assert: current, and each vector checks out through another path than the one that made it
    assert make_secagg_vectors.render() == text, "run tools/make_secagg_vectors.py"
    ctx = v["context"]["ctx"].encode()
    kdf = v["kdf"]
    back = crypto.agree(bytes.fromhex(kdf["sk_v"]), bytes.fromhex(kdf["pk_u"]), crypto.SHARE_KEY_LABEL, ctx)
    assert back.hex() == kdf["share_key"]
    seal = v["seal"]
    assert crypto.open_sealed(bytes.fromhex(seal["key"]), bytes.fromhex(seal["sealed"]),
                              bytes.fromhex(seal["aad"])).hex() == seal["plaintext"]
    shares = {int(x): shamir.share_value(bytes.fromhex(y)) for x, y in v["shamir"]["shares"].items()}
    assert shamir.reconstruct({x: shares[x] for x in (2, 4, 5)}, 3).hex() == v["shamir"]["secret"]
    r = v["round"]
    total = sum(np.array(d["masked"], np.int64) for d in r["devices"].values()) % 2**32  # int64: no wrap-around
    for d in r["devices"].values():
        total = (total - prg_uint32(bytes.fromhex(d["b"]), total.size).astype(np.int64)) % 2**32
    assert total.tolist() == r["sum_unmasked"]
    # (16.1, 4.6, -2.7) / 19: weights 1, 2, 16, and c's 1.5 clipped to 1
    np.testing.assert_allclose(r["mean"], [16.1 / 19, 4.6 / 19, -2.7 / 19], atol=1e-6)


def test_secagg_messages_cross_the_wire_and_keep_to_their_direction():
    from edgeftl.device.protocol.messages import MessageError, SecAgg, check_place, decode, encode

    # Prepare: a masked stage as the device sends it
    name, payload, masked = to_payload(Masked(np.arange(5, dtype=np.uint32)))
    message = SecAgg("run-1", 3, "ab" * 32, "dev-1", name, payload, masked)
    # Execute
    back = decode(encode(message), 1 << 20)
    # Assert: the same stage comes back; it goes up only, from its own device's topic
    assert isinstance(back, SecAgg) and back.stage == "masked" and back.masked.tolist() == [0, 1, 2, 3, 4]
    assert isinstance(from_payload(back.stage, back.payload, back.masked), Masked)
    check_place("secagg_up", "dev-1", back)
    with pytest.raises(MessageError, match="bad header: secagg stage 'masked' on the secagg_down topic"):
        check_place("secagg_down", "dev-1", back)
    with pytest.raises(MessageError, match="device id mismatch"):
        check_place("secagg_up", "dev-2", back)
    with pytest.raises(MessageError, match="bad header: secagg field 'stage' is str 'gossip', expected one of"):
        decode(encode(SecAgg("run-1", 3, "ab" * 32, "dev-1", "advertise", b"{}")).replace(b'"advertise"',
                                                                                          b'"gossip"   '), 1 << 20)


def test_secure_aggregation_refuses_strategies_that_need_each_update(tmp_path):
    from edgeftl.coordinator.rounds.config import CoordinatorConfig

    with pytest.raises(ValueError, match="--secure-aggregation needs a strategy of fedavg, fedadam, fedyogi"):
        CoordinatorConfig(out=tmp_path, secure_aggregation=True, strategy="lora-svd")
    with pytest.raises(ValueError, match="and no --clip-norm"):
        CoordinatorConfig(out=tmp_path, secure_aggregation=True, clip_norm=1.0)
