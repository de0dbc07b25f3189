"""A bundle loaded for training on a device: tokenizer, frozen lower stack, ORT training session.

Torch-free: numpy, onnxruntime (training build, imported via `edgeftl.device.ort`) and
tokenizers only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeftl.device.manifest import (
    CHECKPOINT,
    EVAL_MODEL,
    LOWER_MODEL,
    OPTIMIZER_MODEL,
    TOKENIZER,
    TRAINING_MODEL,
    BundleError,
    Manifest,
    verify_bundle,
)
from edgeftl.device.ort import session_options, training_api

IGNORE_INDEX = -100  # causal-LM label for padding; matches the loss in the training graph


class BundleRuntime:
    """Train and evaluate one bundle's trainable parameters with ONNX Runtime Training."""

    def __init__(self, folder: Path, threads: int | None = None, verify: bool = True,
                 checkpoint: Path | None = None, shared_arena: bool = True) -> None:
        """Load a bundle.

        Args:
            folder: the bundle folder.
            threads: intra-op threads for ONNX Runtime (None: its default).
            verify: check every bundle file's sha256 first.
            checkpoint: start from this ORT checkpoint (a saved device state, optimizer state
                included) instead of the bundle's own.
            shared_arena: let every session of this runtime (training, eval, optimizer, lower
                stack) draw from one memory arena (`device/ort.py` `session_options`).
        """
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.manifest: Manifest = verify_bundle(self.folder) if verify else _read(self.folder)
        api = training_api()
        options = session_options(threads, shared_arena=shared_arena)
        checkpoint = Path(checkpoint) if checkpoint else self.folder / CHECKPOINT
        self.state = api.CheckpointState.load_checkpoint(str(checkpoint))
        # Every model file this runtime opened, for the "bytes of model files loaded" metric.
        self.loaded_files: list[Path] = [checkpoint, self.folder / TRAINING_MODEL, self.folder / EVAL_MODEL,
                                         self.folder / OPTIMIZER_MODEL, self.folder / TOKENIZER]
        training_options = session_options(threads, training=True, shared_arena=shared_arena)
        self.module = api.Module(str(self.folder / TRAINING_MODEL), self.state, str(self.folder / EVAL_MODEL),
                                 session_options=training_options)
        self.optimizer = api.Optimizer(str(self.folder / OPTIMIZER_MODEL), self.module)
        size = self.module.get_parameters_size(trainable_only=True)
        if size != self.manifest.trainable_count:
            raise BundleError(
                f"manifest lists {self.manifest.trainable_count} trainable values but the training graph has "
                f"{size}; the bundle is inconsistent, rebuild it"
            )
        self.lower = None
        if self.manifest.split:
            import onnxruntime as ort

            self.lower = ort.InferenceSession(str(self.folder / LOWER_MODEL), options,
                                              providers=["CPUExecutionProvider"])
            self.loaded_files.append(self.folder / LOWER_MODEL)
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))
        self.tokenizer.enable_truncation(self.manifest.max_seq_len)
        self.tokenizer.no_padding()
        self.label_index = {label: i for i, label in enumerate(self.manifest.labels)}

    # ---- inputs -------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, (batch, seq) int64, padded to the longest text."""
        encodings = self.tokenizer.encode_batch(texts)
        seq = max(1, max(len(e.ids) for e in encodings))
        ids = np.full((len(texts), seq), self.manifest.inputs["pad_token_id"], dtype=np.int64)
        mask = np.zeros((len(texts), seq), dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        return ids, mask

    def token_ids(self, texts: list[str], chunk: int = 64) -> Iterator[list[int]]:
        """Token ids of each text (truncated to max_seq_len), in order.

        Tokenized `chunk` texts at a time: an `Encoding` also keeps token strings and offsets,
        and holding those for a whole data file raised a device's resident memory by ~25 MiB
        (BBC, 1,780 articles) for the rest of the run.
        """
        for start in range(0, len(texts), chunk):
            for encoding in self.tokenizer.encode_batch(texts[start:start + chunk]):
                yield encoding.ids

    def features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """What the training graph takes as its first input: ids, or the frozen lower stack's output.

        The lower stack runs one example at a time on its unpadded tokens, the computation
        the on-disk cache (device/cache.py) stores: the int8 lower graph quantizes activations
        per tensor, so batching examples together would make one example's features depend
        on the others and on padding. It also bounds the lower stack's memory to one sequence
        (MiniLM int8 split, 16 x 128 tokens: +55 MiB at once, +2 MiB one by one). Padded
        positions get zeros; the top graph masks them.
        """
        if self.lower is None:
            return ids
        out = np.zeros((*ids.shape, self.manifest.hidden_size), dtype=np.float32)  # (batch, seq, hidden)
        for row in range(len(ids)):
            length = max(int(mask[row].sum()), 1)
            if mask[row, :length].all():  # right-padded, as encode() pads: the tokens alone
                tokens, row_mask = ids[row:row + 1, :length], np.ones((1, length), dtype=mask.dtype)
            else:
                tokens, row_mask = ids[row:row + 1], mask[row:row + 1]
            out[row, :tokens.shape[1]] = self.lower.run(None, {"input_ids": tokens, "attention_mask": row_mask})[0][0]
        return out

    def targets(self, ids: np.ndarray, mask: np.ndarray, labels: list[str] | None) -> np.ndarray:
        if self.manifest.task == "causal-lm":
            return np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int64)
        return np.array([self.label_index[label] for label in labels], dtype=np.int64)

    # ---- steps --------------------------------------------------------------------------
    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(lr)

    def accumulate(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray, weight: float = 1.0) -> float:
        """Forward + backward, adding `weight` x this batch's gradient to the accumulated one.

        Returns the unweighted loss of this (micro-)batch.
        """
        self.module.train()
        loss, _ = self.module(features, mask, targets, np.array(weight, dtype=np.float32))
        return float(loss) / weight if weight else 0.0

    def apply_step(self) -> None:
        """One optimizer step on the accumulated gradient, then clear it."""
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def train_step(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> float:
        """Forward, backward and one optimizer step; returns the batch loss."""
        loss = self.accumulate(features, mask, targets)
        self.apply_step()
        return loss

    def eval_step(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        self.module.eval()
        loss, logits = self.module(features, mask, targets, np.array(1.0, dtype=np.float32))
        return float(loss), logits

    # ---- parameters as one vector -------------------------------------------------------
    def get_flat(self) -> np.ndarray:
        """Trainable parameters as one float32 vector, in manifest (ORT buffer) order."""
        return self.module.get_contiguous_parameters(trainable_only=True).numpy().copy()

    def set_flat(self, vector: np.ndarray) -> None:
        size = self.module.get_parameters_size(trainable_only=True)
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        if vector.shape != (size,):
            raise ValueError(f"parameter vector has shape {vector.shape}, this bundle needs ({size},)")
        if not np.isfinite(vector).all():
            raise ValueError("parameter vector holds NaN or Inf values; refusing to load it")
        buffer = self.module.get_contiguous_parameters(trainable_only=True)
        buffer.numpy()[:] = vector
        self.module.copy_buffer_to_parameters(buffer, trainable_only=True)


def _read(folder: Path) -> Manifest:
    from edgeftl.device.manifest import read_manifest

    return read_manifest(folder)
