"""How edgeftl writes files that others read: whole or not at all, and records one line at a time.

Bundles, device states, checkpoints, data splits and reports are read by other processes (a
device, the coordinator after a restart, a report), sometimes while they are being written or
after the writer was killed. A reader must never see half a file, so every such file is written
beside its destination and renamed over it (`os.replace` is atomic within one file system).
Run records are JSON lines appended with one `write` each, so concurrent appenders do not
interleave and a killed writer leaves at most one truncated last line, which readers skip.

Standard library only: devices import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it when the block ends without an error.

    For writers that need a path or handle of their own (`np.savez`, a csv writer); on an
    error the temporary file is removed and `path` is left as it was.

    Args:
        path: the destination; its folder must exist.
        mode: permission bits for the finished file. None keeps `mkstemp`'s 0600, the right
            default for files only this user reads (states, checkpoints).

    Yields:
        The temporary path (an empty file) to write.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` (text is UTF-8) to `path` so that readers see the old file or the new one.

    Args:
        path: the destination; its folder must exist.
        data: the whole content.
        mode: permission bits, as in `atomic_path`.
    """
    with atomic_path(path, mode) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as a sorted JSON line; the one writer of edgeftl's run records.

    One `write` per line, so concurrent appenders do not interleave. The folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
