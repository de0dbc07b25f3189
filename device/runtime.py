"""A bundle loaded for training on a device: tokenizer, frozen lower stack, stock ONNX Runtime sessions.

Torch-free: numpy, stock onnxruntime and tokenizers only. The training graph computes the loss
and the gradient of every trainable parameter (`P_grad` outputs); this runtime adds
micro-batch gradients up in numpy and runs AdamW on the flat trainable vector
(`device/optim.py`). Every parameter is a graph input: the frozen weights are read once from
params.safetensors and shared by the training and the evaluation session, and the trainable
ones are views into the flat vector, so an optimizer step or `set_flat` changes what the next
run reads without copying anything into ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeftl.device.optim import AdamW
from edgeftl.device.ort import session_options
from edgeftl.device.params import ParamsError, read_params
from edgeftl.device.protocol.manifest import (
    CAUSAL_LM,
    EVAL_MODEL,
    GRAD_SUFFIX,
    LOWER_MODEL,
    PARAMS,
    TOKENIZER,
    TRAINING_MODEL,
    BundleError,
    Manifest,
    verify_bundle,
)

IGNORE_INDEX = -100  # causal-LM label for padding; matches the loss in the training graph


class BundleRuntime:
    """Train and evaluate one bundle's trainable parameters with stock ONNX Runtime and numpy AdamW."""

    def __init__(self, folder: Path, threads: int | None = None, verify: bool = True,
                 shared_arena: bool = True, train: bool = True) -> None:
        """Load a bundle.

        Args:
            folder: the bundle folder.
            threads: intra-op threads for ONNX Runtime (None: its default).
            verify: check every bundle file's sha256 first.
            shared_arena: let every session of this runtime (training, eval, lower stack)
                draw from one memory arena (`device/ort.py` `session_options`).
            train: load the training graph (False: evaluation only, as the coordinator does).

        Raises:
            BundleError: a bundle whose files do not fit its manifest (the message says which).
        """
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest: Manifest = verify_bundle(self.folder) if verify else _read(self.folder)
        self._ort, self._threads, self._shared_arena = ort, threads, shared_arena
        self.flat, self._values = self._load_params()
        self.optimizer = AdamW(self.flat.size, self.manifest.optimizer)
        self.grad = np.zeros_like(self.flat)  # accumulated gradient of the step in progress
        self.lr = 1e-3
        # Every model file this runtime opened, for the "bytes of model files loaded" metric.
        self.loaded_files: list[Path] = [self.folder / PARAMS, self.folder / TRAINING_MODEL, self.folder / TOKENIZER]
        self._input_names: dict[int, list[str]] = {}
        self._grad_outputs = [p.name + GRAD_SUFFIX for p in self.manifest.trainable]
        self._training: Any = None
        if train:
            self._training = self._session(TRAINING_MODEL, training=True)
            self._check_training_graph()
        else:
            self.loaded_files.remove(self.folder / TRAINING_MODEL)
        self._eval = None  # created on first use: a device that never evaluates never holds it
        self.lower = self._session(LOWER_MODEL) if self.manifest.split else None
        if self.lower is not None:
            self.loaded_files.append(self.folder / LOWER_MODEL)
        self.tokenizer = open_tokenizer(self.folder, self.manifest)
        self.label_index = {label: i for i, label in enumerate(self.manifest.labels)}

    def _load_params(self) -> tuple[np.ndarray, dict]:
        """(flat trainable vector, {parameter name: OrtValue}) from params.safetensors."""
        try:
            tensors = read_params(self.folder / PARAMS)
        except (OSError, ParamsError) as exc:
            raise BundleError(f"bundle {str(self.folder)!r}: {exc}") from exc
        flat = _flatten(self.folder, self.manifest, tensors)
        for param in self.manifest.trainable:  # the sessions read the flat vector itself
            tensors[param.name] = flat[param.offset:param.offset + param.size].reshape(param.shape)
        values = {name: self._ort.OrtValue.ortvalue_from_numpy(array) for name, array in tensors.items()}
        self._arrays = tensors  # OrtValues on CPU share these arrays' memory: keep them alive
        return flat, values

    def _session(self, role: str, training: bool = False):
        options = session_options(self._threads, training=training, shared_arena=self._shared_arena)
        try:
            return self._ort.InferenceSession(str(self.folder / role), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types (Fail, NotImplemented, InvalidGraph)
            raise BundleError(f"bundle file {role!r} does not load in onnxruntime {self._ort.__version__} "
                              f"({str(exc).splitlines()[0][:300]}); rebuild the bundle with this edgeftl") from exc

    @property
    def training(self) -> Any:
        """The training session (an onnxruntime InferenceSession)."""
        if self._training is None:
            raise BundleError("this runtime was opened for evaluation only (train=False); it cannot train")
        return self._training

    def _check_training_graph(self) -> None:
        outputs = {o.name for o in self.training.get_outputs()}
        missing = [name for name in ["loss", *self._grad_outputs] if name not in outputs]
        if missing:
            raise BundleError(f"bundle {str(self.folder)!r}: the training graph lacks outputs {missing[:3]}; "
                              "rebuild the bundle")
        self._param_inputs(self.training)

    @property
    def eval_session(self):
        if self._eval is None:
            self._eval = self._session(EVAL_MODEL)
            self.loaded_files.append(self.folder / EVAL_MODEL)
        return self._eval

    # ---- inputs -------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, (batch, seq) int64, padded to the longest text."""
        encodings = self.tokenizer.encode_batch(texts)
        seq = max(1, max(len(e.ids) for e in encodings))
        ids = np.full((len(texts), seq), self.manifest.inputs.pad_token_id, dtype=np.int64)
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

    def targets(self, ids: np.ndarray, mask: np.ndarray, labels: Sequence[str | None] | None) -> np.ndarray:
        if self.manifest.task == CAUSAL_LM:
            return np.where(mask == 1, ids, IGNORE_INDEX).astype(np.int64)
        if labels is None or any(label is None for label in labels):
            raise BundleError("a classify bundle needs a label for every example")
        return np.array([self.label_index[str(label)] for label in labels], dtype=np.int64)

    # ---- steps --------------------------------------------------------------------------
    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)

    def _feeds(self, session, features: np.ndarray, mask: np.ndarray, targets: np.ndarray, weight: float) -> dict:
        """The session's inputs: the batch under its role names, every parameter from `_values`."""
        data = (features, mask, targets, np.array(weight, dtype=np.float32))
        # np.require, not np.ascontiguousarray: that one turns the 0-d weight into shape (1,).
        feeds = {name: self._ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C"))
                 for name, array in zip(self.manifest.inputs.training, data)}
        feeds.update((name, self._values[name]) for name in self._param_inputs(session))
        return feeds

    def _param_inputs(self, session) -> list[str]:
        names = self._input_names.get(id(session))
        if names is None:
            roles = set(self.manifest.inputs.training)
            names = self._input_names[id(session)] = [i.name for i in session.get_inputs() if i.name not in roles]
            unfed = [name for name in names if name not in self._values]
            if unfed:
                raise BundleError(f"bundle {str(self.folder)!r}: graph inputs {unfed[:3]} are not in {PARAMS}; "
                                  "rebuild the bundle")
        return names

    def accumulate(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray, weight: float = 1.0) -> float:
        """Forward + backward, adding `weight` x this batch's gradient to the accumulated one.

        Returns the unweighted loss of this (micro-)batch.
        """
        outputs = self.training.run_with_ort_values(["loss", *self._grad_outputs],
                                                    self._feeds(self.training, features, mask, targets, weight))
        for param, value in zip(self.manifest.trainable, outputs[1:]):
            self.grad[param.offset:param.offset + param.size] += value.numpy().reshape(-1)
        return float(outputs[0].numpy()) / weight if weight else 0.0

    def apply_step(self) -> None:
        """One AdamW step on the accumulated gradient, then clear it."""
        self.optimizer.step(self.flat, self.grad, self.lr)
        self.grad[:] = 0.0

    def train_step(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> float:
        """Forward, backward and one optimizer step; returns the batch loss."""
        loss = self.accumulate(features, mask, targets)
        self.apply_step()
        return loss

    def eval_step(self, features: np.ndarray, mask: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        session = self.eval_session
        feeds = self._feeds(session, features, mask, targets, 1.0)
        loss, logits = session.run_with_ort_values(["loss", "logits"], feeds)
        return float(loss.numpy()), logits.numpy()

    # ---- parameters as one vector -------------------------------------------------------
    def get_flat(self) -> np.ndarray:
        """Trainable parameters as one float32 vector (a copy), in manifest order."""
        return self.flat.copy()

    def set_flat(self, vector: np.ndarray) -> None:
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != self.flat.shape:
            raise ValueError(f"parameter vector has shape {vector.shape}, this bundle needs {self.flat.shape}")
        if not np.isfinite(vector).all():
            raise ValueError("parameter vector holds NaN or Inf values; refusing to load it")
        self.flat[:] = vector  # in place: the sessions' OrtValues view this memory

    def parameters(self) -> dict[str, np.ndarray]:
        """Trainable parameters by name (copies)."""
        return self._named(self.flat)

    def gradients(self) -> dict[str, np.ndarray]:
        """The accumulated gradient by name (copies), before `apply_step` clears it."""
        return self._named(self.grad)

    def _named(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        return {p.name: vector[p.offset:p.offset + p.size].reshape(p.shape).copy() for p in self.manifest.trainable}

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's step count and moments (copies), for the device's saved state."""
        return {key: np.array(value) for key, value in self.optimizer.state().items()}

    def load_optimizer_state(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load_state(state)


def trainable_vector(folder: Path, manifest: Manifest) -> np.ndarray:
    """A bundle's initial trainable parameters as one vector, read without loading any graph.

    Raises:
        BundleError: params.safetensors is unreadable or does not hold what the manifest lists.
    """
    try:
        tensors = read_params(Path(folder) / PARAMS, {p.name for p in manifest.trainable})
    except (OSError, ParamsError) as exc:
        raise BundleError(f"bundle {str(folder)!r}: {exc}") from exc
    return _flatten(Path(folder), manifest, tensors)


def _flatten(folder: Path, manifest: Manifest, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The manifest's trainable tensors back to back at their offsets, each checked against the manifest."""
    flat = np.zeros(manifest.trainable_count, dtype=np.float32)
    for param in manifest.trainable:
        array = tensors.get(param.name)
        if array is None or list(array.shape) != param.shape or array.dtype != np.float32:
            found = "missing" if array is None else f"{array.dtype} {list(array.shape)}"
            raise BundleError(f"bundle {str(folder)!r}: trainable parameter {param.name!r} is {found} in "
                              f"{PARAMS}, the manifest says float32 {param.shape}; rebuild the bundle")
        flat[param.offset:param.offset + param.size] = array.reshape(-1)
    return flat


def open_tokenizer(folder: Path, manifest: Manifest):
    """The bundle's tokenizer, truncating at its max_seq_len, unpadded (`encode` pads)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / TOKENIZER))
    tokenizer.enable_truncation(manifest.max_seq_len)
    tokenizer.no_padding()
    return tokenizer


def _read(folder: Path) -> Manifest:
    from edgeftl.device.protocol.manifest import read_manifest

    return read_manifest(folder)
