"""The device's own file format and optimizer: params.safetensors (device/params.py) and AdamW (device/optim.py).

AdamW's expected values are worked out by hand from its definition (docs/BUNDLE.md §6); the
equivalence tests compare it with ONNX Runtime Training's kernel over whole plans.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from edgeftl.device.optim import AdamW, AdamWConfig
from edgeftl.device.params import ParamsError, read_header, read_params, write_params

TENSORS = {
    "w_q": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
    "w_scale": np.array([0.5, 0.25, 2.0], dtype=np.float32),
    "packed": np.array([0x12, 0xF0, 0x7A], dtype=np.uint8),
    "lora_A": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4),
    "steps": np.array([3], dtype=np.int64),
}


def test_written_params_read_back_exactly_and_by_the_safetensors_package(tmp_path: Path) -> None:
    # Prepare
    from safetensors.numpy import load_file

    path = tmp_path / "params.safetensors"

    # Execute
    write_params(path, TENSORS, {"format": "edgeftl"})
    ours, theirs = read_params(path), load_file(str(path))
    header, metadata, start = read_header(path)

    # Assert: same names, dtypes, shapes and bytes both ways; data 8-byte aligned, widest first
    for name, array in TENSORS.items():
        for got in (ours[name], theirs[name]):
            assert got.dtype == array.dtype and got.shape == array.shape
            np.testing.assert_array_equal(got, array)
    assert metadata == {"format": "edgeftl"} and start % 8 == 0
    assert header["steps"]["data_offsets"][0] == 0  # int64 first: every tensor starts aligned to its item size
    assert read_params(path, {"lora_A"}).keys() == {"lora_A"}


@pytest.mark.parametrize(("damage", "words"), [
    (lambda raw: raw[:5], ["shorter than 8 bytes"]),
    (lambda raw: struct.pack("<Q", 10**9) + raw[8:], ["header length"]),
    (lambda raw: raw[:8] + b"x" + raw[9:], ["not JSON"]),
    (lambda raw: raw[:-3], ["bytes but the header describes"]),
], ids=["truncated-head", "header-length-lie", "header-not-json", "truncated-data"])
def test_a_damaged_params_file_is_refused_with_one_line(damage, words: list[str], tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "params.safetensors"
    write_params(path, TENSORS)
    path.write_bytes(damage(path.read_bytes()))

    # Execute
    with pytest.raises(ParamsError) as caught:
        read_params(path)

    # Assert
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert all(word in message for word in words), message


def test_adamw_first_two_steps_match_the_hand_computed_update() -> None:
    # Prepare: mode 1 (bias correction folded into lr), betas 0.9 / 0.999, eps 1e-6
    config = AdamWConfig(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, bias_correction=True, mode=1)
    params = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    g1, g2 = np.array([0.1, -0.2, 0.0], np.float32), np.array([0.3, 0.0, -0.4], np.float32)
    optimizer = AdamW(3, config)

    # Execute
    optimizer.step(params, g1, lr=0.01)
    after_one = params.copy()
    optimizer.step(params, g2, lr=0.01)

    # Assert: t=1: m = 0.1 g, v = 0.001 g^2, lr_t = 0.01 sqrt(0.001) / 0.1, so p moves by
    # lr_t * 0.1 g / (sqrt(0.001) |g| + 1e-6), about 0.01 * sign(g); a zero gradient moves nothing.
    def update(m: np.ndarray, v: np.ndarray, t: int) -> np.ndarray:
        lr_t = 0.01 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        return lr_t * m / (np.sqrt(v) + 1e-6)

    m1, v1 = 0.1 * g1, 0.001 * g1**2
    expected_one = np.array([1.0, -2.0, 0.5]) - update(m1, v1, 1)
    m2, v2 = 0.9 * m1 + 0.1 * g2, 0.999 * v1 + 0.001 * g2**2
    expected_two = expected_one - update(m2, v2, 2)
    np.testing.assert_allclose(after_one, expected_one, rtol=1e-6)
    np.testing.assert_allclose(params, expected_two, rtol=1e-6)
    assert after_one[2] == 0.5 and optimizer.step_count == 2


def test_adamw_weight_decay_and_torch_mode() -> None:
    # Prepare: zero gradient, so only decoupled weight decay moves the parameters
    params = np.array([2.0, -4.0], dtype=np.float32)
    hf = AdamW(2, AdamWConfig(weight_decay=0.1, mode=1))
    torch_style = AdamW(2, AdamWConfig(weight_decay=0.1, mode=0))
    a, b = params.copy(), params.copy()

    # Execute
    hf.step(a, np.zeros(2, np.float32), lr=0.5)
    torch_style.step(b, np.zeros(2, np.float32), lr=0.5)

    # Assert: p * (1 - lr * wd) = p * 0.95 in both modes
    np.testing.assert_allclose(a, params * 0.95, rtol=1e-6)
    np.testing.assert_allclose(b, params * 0.95, rtol=1e-6)


def test_adamw_state_round_trips_and_refuses_another_size() -> None:
    # Prepare
    optimizer = AdamW(4, AdamWConfig())
    optimizer.step(np.ones(4, np.float32), np.full(4, 0.5, np.float32), lr=0.1)
    state = {k: np.array(v) for k, v in optimizer.state().items()}
    restored = AdamW(4, AdamWConfig())

    # Execute
    restored.load_state(state)

    # Assert
    assert restored.step_count == 1
    np.testing.assert_array_equal(restored.m, optimizer.m)
    with pytest.raises(ValueError, match="shapes"):
        AdamW(5, AdamWConfig()).load_state(state)


@pytest.mark.parametrize("bad", [{"beta1": 1.0}, {"eps": 0.0}, {"mode": 2}, {"kind": "sgd"}, {"momentum": 0.9}])
def test_adamw_config_names_what_is_wrong(bad: dict) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        AdamWConfig.from_dict({"kind": "adamw", **bad})
