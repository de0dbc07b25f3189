"""AdamW on the trainable parameter vector, in numpy: the optimizer the ORT training build ran as a graph.

Bundles built with ONNX Runtime Training's `AdamWOptimizer` node (com.microsoft, CPU kernel
`orttraining/training_ops/cpu/optimizer/adamw/adamw.cc`) are trained here with the same
arithmetic, in float32, in the same order, so the two agree to float rounding (7.5e-9 on
MiniLM's LoRA parameters after 5 steps, FACTS). The manifest's `optimizer` entry (`AdamWConfig`)
carries the settings the build read off that node. With t the 1-based step:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mode 1 (Hugging Face AdamW, what edgeftl bundles use):
        lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)      (lr if bias correction is off)
        p = p - lr_t * m / (sqrt(v) + eps);  then  p = p - lr * weight_decay * p
    mode 0 (PyTorch AdamW):
        p = p - lr * weight_decay * p;  then  p = p - lr * m / ((1 - beta1^t) * (sqrt(v / (1 - beta2^t)) + eps))
"""

from __future__ import annotations

import math

import numpy as np

# The settings' schema is the manifest's, where the build writes them; imported here for callers.
from edgeftl.device.protocol.manifest import AdamWConfig

__all__ = ["AdamW", "AdamWConfig"]


class AdamW:
    """In-place AdamW on one float32 vector; its state is (step, m, v)."""

    def __init__(self, size: int, config: AdamWConfig) -> None:
        self.config = config
        self.step_count = 0  # optimizer steps taken
        self.m = np.zeros(size, dtype=np.float32)
        self.v = np.zeros(size, dtype=np.float32)
        self._scratch = np.empty(size, dtype=np.float32)

    def step(self, params: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """Update `params` (float32, in place) with gradient `grad`."""
        c, m, v, tmp = self.config, self.m, self.v, self._scratch
        t = self.step_count + 1
        f32 = np.float32
        m *= f32(c.beta1)
        m += (f32(1) - f32(c.beta1)) * grad  # in float32, as the kernel's 1.f - alpha_
        np.multiply(f32(1) - f32(c.beta2), grad, out=tmp)  # ((1 - beta2) * g) * g, the kernel's order
        tmp *= grad
        v *= f32(c.beta2)
        v += tmp
        # The kernel computes the corrections as float(1 - pow(beta, t)) with pow in double.
        alpha_corr = f32(1.0) - f32(math.pow(f32(c.beta1), t)) if c.bias_correction else f32(1.0)
        beta_corr = f32(1.0) - f32(math.pow(f32(c.beta2), t)) if c.bias_correction else f32(1.0)
        if c.mode == 1:
            lr_t = f32(lr) * (f32(math.sqrt(beta_corr)) / alpha_corr)
            np.sqrt(v, out=tmp)
            tmp += f32(c.eps)
            np.divide(lr_t * m, tmp, out=tmp)
            params -= tmp
            if c.weight_decay:
                params -= f32(lr) * f32(c.weight_decay) * params
        else:
            if c.weight_decay:
                params -= params * f32(lr) * f32(c.weight_decay)
            np.divide(v, beta_corr, out=tmp)
            np.sqrt(tmp, out=tmp)
            tmp += f32(c.eps)
            tmp *= alpha_corr
            np.divide(f32(lr) * m, tmp, out=tmp)
            params -= tmp
        self.step_count = t

    def state(self) -> dict[str, np.ndarray]:
        return {"step": np.array(self.step_count, dtype=np.int64), "m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore (step, m, v); raises ValueError if the shapes do not fit."""
        m, v = np.asarray(state["m"], dtype=np.float32), np.asarray(state["v"], dtype=np.float32)
        if m.shape != self.m.shape or v.shape != self.v.shape:
            raise ValueError(f"optimizer moments have shapes {m.shape} / {v.shape}, this bundle needs {self.m.shape}")
        self.step_count = int(state["step"])
        self.m[:], self.v[:] = m, v
