"""Update codecs: exact byte counts, hand-checked values, error feedback, hostile payloads."""

from __future__ import annotations

import numpy as np
import pytest

from edgeftl.device.protocol.codecs import CodecError, Encoded, ErrorFeedback, parse_codec


def test_int8_block_codec_hand_computed():
    # Prepare: one block of 8 values; scale = max|v| / 127 = 1.27 / 127 = 0.01
    codec = parse_codec("int8:8")
    v = np.array([1.27, -1.27, 0.0, 0.005, 0.006, -0.635, 0.1, 0.2], dtype=np.float32)
    # Execute
    encoded, decoded = codec.roundtrip(v)
    # Assert
    assert encoded.arrays["scale"].tolist() == pytest.approx([0.01])
    assert encoded.arrays["codes"].tolist() == [127, -127, 0, 0, 1, -64, 10, 20]  # rint(0.5)=0, rint(0.6)=1
    assert encoded.nbytes == 8 + 4
    np.testing.assert_allclose(decoded, [1.27, -1.27, 0, 0, 0.01, -0.64, 0.1, 0.2], atol=1e-6)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codec = parse_codec("int4:8")
    v = np.array([7, -7, 1, 0, 0, 0, 0, 0], dtype=np.float32)  # scale = 7/7 = 1
    encoded, decoded = codec.roundtrip(v)
    # codes + 8: [15, 1, 9, 8, 8, 8, 8, 8] -> bytes (15 | 1<<4), (9 | 8<<4), ...
    assert encoded.arrays["codes"].tolist() == [15 | 1 << 4, 9 | 8 << 4, 8 | 8 << 4, 8 | 8 << 4]
    np.testing.assert_array_equal(decoded, v)


def test_dense_codecs_byte_counts_and_errors():
    v = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    expected = {"none": 4000, "fp16": 2000, "int8": 1000 + 4 * 4, "int4": 500 + 4 * 4}
    for spec, nbytes in expected.items():
        encoded, decoded = parse_codec(spec).roundtrip(v)
        assert encoded.nbytes == nbytes, spec
        assert decoded.shape == v.shape and decoded.dtype == np.float32
    assert np.array_equal(parse_codec("none").roundtrip(v)[1], v)
    rel = lambda spec: np.linalg.norm(parse_codec(spec).roundtrip(v)[1] - v) / np.linalg.norm(v)
    assert rel("fp16") < 1e-3 and rel("int8") < 0.01 and rel("int4") < 0.2


def test_topk_keeps_the_largest_values_and_their_positions():
    v = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05], dtype=np.float32)
    encoded, decoded = parse_codec("topk:0.375").roundtrip(v)  # round(8 * 0.375) = 3 values
    assert encoded.arrays["gaps"].tolist() == [1, 2, 3]  # positions 1, 3, 6 as gaps
    np.testing.assert_array_equal(decoded, [0, -5.0, 0, 3.0, 0, 0, 4.0, 0])
    assert encoded.nbytes == 3 * 2 + 3 * 4


def test_topk_falls_back_to_uint32_positions_when_a_gap_exceeds_uint16():
    v = np.zeros(70_000, dtype=np.float32)
    v[[5, 69_999]] = [1.0, 2.0]
    encoded, decoded = parse_codec("topk:0.00003").roundtrip(v)  # 2 values, gap 69,994
    assert encoded.arrays["index"].tolist() == [5, 69_999] and "gaps" not in encoded.arrays
    np.testing.assert_array_equal(decoded, v)


def test_error_feedback_eventually_sends_everything():
    # With feedback, the running sum of decoded updates tracks the running sum of true updates.
    rng = np.random.default_rng(1)
    feedback = ErrorFeedback(parse_codec("topk:0.1+int8:16"), 200)
    sent, true = np.zeros(200, np.float32), np.zeros(200, np.float32)
    for _ in range(60):
        update = rng.normal(size=200).astype(np.float32)
        true += update
        sent += feedback.encode(update)[1]
    # The gap is exactly the residual still held back: bounded, not growing with rounds.
    np.testing.assert_allclose(true - sent, feedback.residual, atol=1e-3)
    assert np.linalg.norm(feedback.residual) < 0.5 * np.linalg.norm(true)


@pytest.mark.parametrize("spec", ["", "int3", "topk:0", "topk:1.5", "topk:0.1+topk:0.1", "fp16:8", "int8:7", "zstd",
                                  "sign:7", "sign:x"])
def test_bad_specs_name_the_spec_and_the_accepted_forms(spec):
    with pytest.raises(CodecError, match="accepted"):
        parse_codec(spec)


def test_non_finite_vectors_are_refused():
    with pytest.raises(CodecError, match="NaN"):
        parse_codec("int8").encode(np.array([1.0, np.nan], dtype=np.float32))


@pytest.mark.parametrize("arrays", [
    {},  # missing
    {"codes": np.zeros(3, np.int8), "scale": np.ones(1, np.float32)},  # wrong length
    {"codes": np.zeros(8, np.int16), "scale": np.ones(1, np.float32)},  # wrong dtype
    {"codes": np.zeros(8, np.int8), "scale": np.array([np.inf], np.float32)},  # non-finite scale
])
def test_hostile_int8_payloads_raise_codec_error(arrays):
    with pytest.raises(CodecError):
        parse_codec("int8:8").decode(Encoded("int8:8", 8, arrays))


def test_hostile_topk_indices_raise_codec_error():
    codec = parse_codec("topk:0.25")
    for index in ([9, 1], [3, 3], [1, 100]):
        payload = Encoded(codec.spec, 8, {"index": np.array(index, np.uint32), "v.values": np.ones(2, np.float32)})
        with pytest.raises(CodecError):
            codec.decode(payload)
    for gaps in ([3, 0], [5, 5]):  # a repeated position; a position past the end
        payload = Encoded(codec.spec, 8, {"gaps": np.array(gaps, np.uint16), "v.values": np.ones(2, np.float32)})
        with pytest.raises(CodecError):
            codec.decode(payload)


def test_sign_codec_hand_computed_one_bit_per_value_and_the_mean_magnitude_per_block():
    # Prepare: two blocks of 8, the second cut to 2 values; scales mean|block| = 0.8 / 8 = 0.1 and 0.5
    codec = parse_codec("sign:8")
    v = np.array([0.1, -0.2, 0.0, 0.3, -0.1, 0.05, -0.05, 0.0, 0.4, -0.6], dtype=np.float32)
    # Execute
    encoded, decoded = codec.roundtrip(v)
    # Assert: bits (x >= 0) 1,0,1,1,0,1,0,1 | 1,0 -> 0b10110101 = 181, 0b10000000 = 128
    assert encoded.arrays["bits"].tolist() == [181, 128]
    assert encoded.arrays["scale"].tolist() == pytest.approx([0.1, 0.5])
    assert encoded.nbytes == 2 + 2 * 4
    np.testing.assert_allclose(decoded, [0.1, -0.1, 0.1, 0.1, -0.1, 0.1, -0.1, 0.1, 0.5, -0.5], atol=1e-7)
    assert codec.spec == "sign:8" and parse_codec("SIGN").spec == "sign:256"


def test_sign_bytes_and_the_energy_it_keeps_of_an_adam_like_update_against_topk():
    # An Adam update moves every coordinate by about the learning rate: signs keep it, top-1% cannot.
    rng = np.random.default_rng(0)
    n = 26501  # the BBC bundle's trainable count
    update = (np.sign(rng.normal(size=n)) * 0.01 * rng.uniform(0.5, 1.0, size=n)).astype(np.float32)
    encoded, decoded = parse_codec("sign").roundtrip(update)
    assert encoded.nbytes == -(-n // 8) + 4 * -(-n // 256)  # 3,313 + 416
    kept = lambda d: 1 - np.linalg.norm(update - d) ** 2 / np.linalg.norm(update) ** 2
    assert kept(decoded) > 0.95
    assert kept(parse_codec("topk:0.01+int8").roundtrip(update)[1]) < 0.05


def test_sign_with_error_feedback_tracks_the_sum_of_updates_and_nests_in_topk():
    rng = np.random.default_rng(2)
    for spec in ("sign:16", "topk:0.25+sign:16"):
        feedback = ErrorFeedback(parse_codec(spec), 200)
        sent, true = np.zeros(200, np.float32), np.zeros(200, np.float32)
        for _ in range(60):
            update = rng.normal(size=200).astype(np.float32)
            true += update
            sent += feedback.encode(update)[1]
        np.testing.assert_allclose(true - sent, feedback.residual, atol=1e-3)
        assert np.linalg.norm(feedback.residual) < 0.5 * np.linalg.norm(true), spec


@pytest.mark.parametrize("arrays", [
    {"bits": np.zeros(1, np.uint8)},  # no scale
    {"bits": np.zeros(1, np.uint8), "scale": np.ones(2, np.float32)},  # 8 values are one block
    {"bits": np.zeros(2, np.uint8), "scale": np.ones(1, np.float32)},  # 16 bits for 8 values
    {"bits": np.zeros(1, np.uint8), "scale": np.array([-1.0], np.float32)},  # a negative magnitude
    {"bits": np.zeros(1, np.uint8), "scale": np.array([np.nan], np.float32)},
])
def test_hostile_sign_payloads_raise_codec_error(arrays):
    with pytest.raises(CodecError):
        parse_codec("sign:8").decode(Encoded("sign:8", 8, arrays))
