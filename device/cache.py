"""On-disk cache of the frozen lower backbone's outputs, so later epochs run only the trainable top.

A split bundle trains blocks [first, n) on the hidden states of a frozen lower stack. Those
hidden states depend only on the lower model, the tokenizer, the maximum length and the text,
so they are computed once per example and kept on disk under a key made of exactly those:

    <cache_dir>/lower-<key>/features.npy   (total_tokens, hidden) float32, examples back to back
                            ids.npy        (total_tokens,) int32 token ids (causal-LM targets)
                            offsets.npy    (n_examples + 1,) int64, example i is rows [o[i], o[i+1])
                            meta.json      keys, counts and the sha256 of each array file

Choices, and why:
- float32, not float16: the cached path then gives the same numbers as running the lower model
  (bit-identical at micro-batch 1); disk is cheaper than RAM on the boards we target, and fp16
  would both round the activations and overflow on outliers.
- One example per lower-model call, stored at its true length, so an example's features never
  depend on its batch neighbours or on padding (lower models built before the int8 lower stack
  became weight-only quantized activations per tensor, where a batched call did). Micro-batches
  are padded at use.
- Reads use `pread` into a fresh array rather than `mmap`: resident file pages of a mapping
  count in RSS, and the device's memory figure should not grow with the cache size.
- Entries are written to a temporary folder and renamed into place; a reader re-hashes every
  file, and a corrupt or partial entry is removed and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeftl.device.data import Example
from edgeftl.device.protocol.manifest import LOWER_MODEL, TOKENIZER, Manifest, sha256_file

CACHE_ENV = "EDGEFTL_CACHE"
CACHE_FORMAT = 1
FEATURES, IDS, OFFSETS, META = "features.npy", "ids.npy", "offsets.npy", "meta.json"
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # (features, attention mask, targets)


class CacheCorrupt(ValueError):
    """A cache entry that does not match its metadata; it is rebuilt, never used."""


def default_cache_dir() -> Path:
    """$EDGEFTL_CACHE if set, else ~/.cache/edgeftl."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgeftl")


def bundle_key(manifest: Manifest) -> str:
    """What the lower stack's outputs depend on: its model, the tokenizer, the max length, the runtime.

    The ONNX Runtime version is part of it: the int8 lower stack's outputs differ by 6% (relative
    norm, token cosine >= 0.996) between onnxruntime 1.19.2 and 1.32, so a cache written by one
    runtime is not what another would compute (FACTS).
    """
    import onnxruntime

    parts: dict[str, object] = {name: manifest.files[name].sha256 for name in (LOWER_MODEL, TOKENIZER)}
    parts["max_seq_len"] = manifest.max_seq_len
    parts["onnxruntime"] = onnxruntime.__version__
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_folder(cache_dir: Path, manifest: Manifest, data_path: Path) -> tuple[Path, dict]:
    keys = {"bundle_key": bundle_key(manifest), "data_key": sha256_file(data_path)}
    key = hashlib.sha256(f"{keys['bundle_key']}:{keys['data_key']}".encode()).hexdigest()[:32]
    return Path(cache_dir) / f"lower-{key}", keys


class FeatureCache:
    """A verified cache entry: per-example lower-stack outputs read on demand."""

    def __init__(self, folder: Path, keys: dict, n_examples: int) -> None:
        self.folder = Path(folder)
        meta = _read_meta(self.folder, keys, n_examples)
        self.hidden = int(meta["hidden"])
        self.offsets = _load_small(self.folder / OFFSETS, np.int64, (n_examples + 1,))
        tokens = int(self.offsets[-1])
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 1) or tokens != meta["n_tokens"]:
            raise CacheCorrupt(f"{self.folder / OFFSETS}: offsets do not describe {n_examples} examples")
        self.ids = _load_small(self.folder / IDS, np.int32, (tokens,))
        self._start = _array_start(self.folder / FEATURES, np.float32, (tokens, self.hidden))
        for name, digest in meta["sha256"].items():
            if sha256_file(self.folder / name) != digest:
                raise CacheCorrupt(f"{self.folder / name}: sha256 differs from the one recorded")
        self._fd = os.open(self.folder / FEATURES, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(features (len, hidden) float32, ids (len,) int64) of example `index`."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        row = self.hidden * 4
        raw = os.pread(self._fd, (hi - lo) * row, self._start + lo * row)
        features = np.frombuffer(raw, dtype=np.float32).reshape(hi - lo, self.hidden)
        return features, self.ids[lo:hi].astype(np.int64)

    def inputs(self, runtime, examples: list[Example]) -> Callable[[list[int]], Batch]:
        """A function from example indices to one padded (features, mask, targets) micro-batch."""
        pad = runtime.manifest.inputs.pad_token_id

        def batch(indices: list[int]) -> Batch:
            rows = [self.example(i) for i in indices]
            seq = max(len(ids) for _, ids in rows)
            features = np.zeros((len(rows), seq, self.hidden), dtype=np.float32)  # (batch, seq, hidden)
            ids = np.full((len(rows), seq), pad, dtype=np.int64)
            mask = np.zeros((len(rows), seq), dtype=np.int64)
            for r, (feats, row_ids) in enumerate(rows):
                features[r, :len(row_ids)], ids[r, :len(row_ids)], mask[r, :len(row_ids)] = feats, row_ids, 1
            return features, mask, runtime.targets(ids, mask, [examples[i].label for i in indices])

        return batch


def open_or_build(runtime, examples: list[Example], data_path: Path, cache_dir: Path,
                  progress: bool = True) -> FeatureCache:
    """The verified cache entry for this bundle and data file, computing it if absent or corrupt.

    Args:
        runtime: a `BundleRuntime` of a split bundle (it has a lower model).
        examples: every example of `data_path`, in file order (the cache is indexed by position).
        data_path: the data file; its bytes are part of the key.
        cache_dir: root folder of the cache.
        progress: show a progress bar while computing.
    """
    folder, keys = entry_folder(cache_dir, runtime.manifest, data_path)
    if folder.exists():
        try:
            return FeatureCache(folder, keys, len(examples))
        except (CacheCorrupt, OSError, ValueError, KeyError, TypeError) as exc:
            print(f"edgeftl: cache entry {folder} is unusable ({exc}); recomputing it", file=sys.stderr)
            _remove(folder)
    _build(runtime, examples, folder, keys, progress)
    return FeatureCache(folder, keys, len(examples))


def _build(runtime, examples: list[Example], folder: Path, keys: dict, progress: bool) -> None:
    from tqdm import tqdm

    folder.parent.mkdir(parents=True, exist_ok=True)
    pad = runtime.manifest.inputs.pad_token_id
    # An empty encoding still gets one row, so every example has features.
    token_ids = [np.asarray(ids or [pad], dtype=np.int32) for ids in runtime.token_ids([e.text for e in examples])]
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in token_ids])]).astype(np.int64)
    hidden = runtime.manifest.hidden_size
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        digest = hashlib.sha256()
        with open(tmp / FEATURES, "wb") as out:
            header = {"descr": "<f4", "fortran_order": False, "shape": (int(offsets[-1]), hidden)}
            np.lib.format.write_array_header_1_0(_Tee(out, digest), header)
            for row in tqdm(token_ids, desc="cache", unit="ex", disable=not progress, leave=False):
                ids = row.astype(np.int64)[None]  # (1, len)
                feats = runtime.features(ids, np.ones_like(ids))  # (1, len, hidden)
                chunk = np.ascontiguousarray(feats[0], dtype=np.float32).tobytes()
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        ids = np.concatenate(token_ids)
        np.save(tmp / IDS, ids)
        np.save(tmp / OFFSETS, offsets)
        sums = {FEATURES: digest.hexdigest(), IDS: sha256_file(tmp / IDS), OFFSETS: sha256_file(tmp / OFFSETS)}
        meta = {"format": CACHE_FORMAT, **keys, "n_examples": len(examples), "n_tokens": int(offsets[-1]),
                "hidden": hidden, "dtype": "float32", "sha256": sums}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same entry first: keep theirs
            if not folder.exists():
                raise
            _remove(tmp)
    except BaseException:
        _remove(tmp)
        raise


class _Tee:
    """A file wrapper that also feeds what is written to a hash (for the .npy header)."""

    def __init__(self, handle, digest) -> None:
        self.handle, self.digest = handle, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)


def _read_meta(folder: Path, keys: dict, n_examples: int) -> dict:
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    expected = {"format": CACHE_FORMAT, **keys, "n_examples": n_examples, "dtype": "float32"}
    wrong = sorted(k for k, v in expected.items() if meta.get(k) != v)
    if wrong or set(meta.get("sha256", {})) != {FEATURES, IDS, OFFSETS}:
        raise CacheCorrupt(f"{folder / META} does not match this bundle and data ({wrong or 'sha256'})")
    return meta


def _array_start(path: Path, dtype: type, shape: tuple[int, ...]) -> int:
    """Byte offset of the data in a .npy file, after checking its header and exact size."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise CacheCorrupt(f"{path}: unsupported .npy version {version}")
        got_shape, fortran, got_dtype = read_header(handle)
        start = handle.tell()
    if tuple(got_shape) != shape or fortran or got_dtype != np.dtype(dtype):
        raise CacheCorrupt(f"{path}: holds {got_dtype}{tuple(got_shape)}, expected {np.dtype(dtype)}{shape}")
    if path.stat().st_size != start + int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise CacheCorrupt(f"{path}: size does not match its header (partial write?)")
    return start


def _load_small(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    _array_start(path, dtype, shape)
    return np.load(path, allow_pickle=False)


def _remove(folder: Path) -> None:
    trash = folder.with_name(f".{folder.name}.trash-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)
