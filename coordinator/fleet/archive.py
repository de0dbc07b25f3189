"""The `edgeftl package` archive: a deterministic .tar.gz and the manifest that vouches for every member.

Layout (flash design contract): edgeftl-package.json (the PackageManifest), bin/edgeftl (the
launcher), site/ (the device runtime and the unpacked wheels), bundle/, service/. Members are
regular files only, sorted, with mtime 0, uid/gid 0, mode 0644 or 0755, in a gzip stream with
mtime 0 and no file name: the same inputs give the same bytes, so the same package has the same
archive hash wherever it is built.

`open_archive` reads the whole archive once and checks every member against the manifest (size,
sha256, mode; nothing missing, nothing extra, no links, devices, absolute or ".." paths) before
any of it is used; `Package` then streams chosen members (a target gets only the files it lacks)
or extracts them, checking each member's sha256 again as it goes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, NamedTuple, cast

from edgeftl.coordinator.fleet.platforms import check_platform, check_python
from edgeftl.device.files import atomic_path
from edgeftl.device.protocol.typed import conform

MANIFEST_NAME = "edgeftl-package.json"
FORMAT = 1
MODES = (0o644, 0o755)
CREATED_BY = "edgeftl package"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
GZIP_LEVEL = 6  # level 9 takes about twice as long for ~1 % less
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArchiveError(ValueError):
    """A package archive that cannot be used; the message names the archive, the member and the fix."""


def _check_sha(value: str, where: str) -> None:
    if not _SHA256.fullmatch(value):
        raise ArchiveError(f"{where} must be 64 lowercase hex digits, got {value[:70]!r}")


def path_problem(path: str) -> str | None:
    """Why `path` may not name an archive member (absolute, "..", empty parts, backslashes), or None."""
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or ".." in parts or "" in parts or "." in parts:
        return f"member {path!r} has an unsafe path (absolute, '..', '.' or empty parts)"
    return None


@dataclass(frozen=True)
class BundleRef:
    """The bundle inside the package: its folder name, identity (bundle_sha256) and what it trains."""

    name: str
    sha256: str
    task: str
    trainable: int  # trainable parameter values

    def __post_init__(self) -> None:
        conform(self, "package.bundle", ArchiveError)
        _check_sha(self.sha256, "package.bundle.sha256")


@dataclass(frozen=True)
class WheelRef:
    """A wheel the site folder was unpacked from: its file name (project, version, tags) and sha256."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        conform(self, "package.wheels[]", ArchiveError)
        _check_sha(self.sha256, f"package.wheels[{self.name!r}].sha256")


@dataclass(frozen=True)
class Member:
    """One archive member as the manifest records it."""

    sha256: str
    size: int
    mode: int  # 0o644 or 0o755 (JSON: 420 or 493)

    def __post_init__(self) -> None:
        conform(self, "package.files[]", ArchiveError)
        _check_sha(self.sha256, "package.files[].sha256")
        if self.size < 0 or self.mode not in MODES:
            raise ArchiveError(f"package.files[] entry has size {self.size} and mode {oct(self.mode)}; accepted: "
                               "size >= 0, mode 0o644 or 0o755")


@dataclass(frozen=True)
class PackageManifest:
    """What a package holds and for which device; `id` names the release on targets."""

    format: int
    platform: str
    python: str
    edgeftl_version: str
    bundle: BundleRef
    wheels: list[WheelRef]
    files: dict[str, Member]  # every member but the manifest itself, by archive path
    created_by: str = CREATED_BY

    def __post_init__(self) -> None:
        conform(self, "package", ArchiveError)
        if self.format != FORMAT:
            raise ArchiveError(f"package format {self.format!r} is not supported (this edgeftl reads {FORMAT}); "
                               "package it again with this edgeftl")
        try:
            check_platform(self.platform)
            check_python(self.python)
        except ValueError as exc:
            raise ArchiveError(f"package: {exc}") from exc
        for path in self.files:
            problem = path_problem(path) or ("it is the manifest's own name" if path == MANIFEST_NAME else None)
            if problem:
                raise ArchiveError(f"package.files: {problem}")

    def to_json(self) -> bytes:
        """The canonical bytes: sorted keys, indent 1, a final newline (`id` hashes them)."""
        return (json.dumps(asdict(self), sort_keys=True, indent=1) + "\n").encode("utf-8")

    @property
    def id(self) -> str:
        """16 hex digits of the canonical manifest's sha256: the release folder's name on targets."""
        return hashlib.sha256(self.to_json()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: bytes) -> PackageManifest:
        """Parse and validate canonical manifest bytes.

        Raises:
            ArchiveError: not JSON, a wrong or unknown field, or bytes that are not canonical.
        """
        from edgeftl.device.protocol.typed import from_json

        try:
            parsed = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"{MANIFEST_NAME} is not valid JSON ({exc})") from exc
        manifest = from_json(cls, parsed, "package", ArchiveError)
        if manifest.to_json() != data:
            raise ArchiveError(f"{MANIFEST_NAME} is not in canonical form (sorted keys, indent 1): it was edited")
        return manifest


def _tarinfo(path: str, size: int, mode: int) -> tarfile.TarInfo:
    """A member header with nothing of the machine that wrote it (owner, time)."""
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime, info.type = size, mode, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(tree: Path, manifest: PackageManifest, out: Path) -> None:
    """Write tree's files (exactly manifest.files) and the manifest as a deterministic .tar.gz, atomically.

    Raises:
        ArchiveError: a file of the manifest is missing from tree or changed size since it was hashed.
    """
    members = sorted([*manifest.files, MANIFEST_NAME])
    with atomic_path(Path(out), 0o644) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in members:
            if path == MANIFEST_NAME:
                data = manifest.to_json()
                tar.addfile(_tarinfo(path, len(data), 0o644), _BytesReader(data))
                continue
            entry, source = manifest.files[path], tree / path
            if not source.is_file() or source.stat().st_size != entry.size:
                raise ArchiveError(f"{source} is missing or changed while packaging; package again")
            with open(source, "rb") as handle:
                tar.addfile(_tarinfo(path, entry.size, entry.mode), handle)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        chunk, self._at = self._data[self._at:end], min(end, len(self._data))
        return chunk


class _Checked:
    """A member's reader that raises ArchiveError once its last byte is read and the sha256 differs."""

    def __init__(self, source: IO[bytes], path: str, entry: Member, archive: Path) -> None:
        self._source, self._path, self._entry, self._archive = source, path, entry, archive
        self._hash, self._left = hashlib.sha256(), entry.size

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return self._left

    def read(self, n: int = -1) -> bytes:
        chunk = self._source.read(self._left if n < 0 else min(n, self._left))
        self._hash.update(chunk)
        self._left -= len(chunk)
        if self._left == 0 and self._hash.hexdigest() != self._entry.sha256:
            raise ArchiveError(_mismatch(self._archive, self._path, self._hash.hexdigest(), self._entry.sha256))
        return chunk


def _mismatch(archive: Path, path: str, found: str, expected: str) -> str:
    return (f"archive {archive}: {path} has sha256 {found[:12]}.., its manifest says {expected[:12]}..: "
            "the archive is damaged; run edgeftl package again")


@dataclass(frozen=True)
class Package:
    """A verified package archive: its manifest, id, and its members on demand."""

    path: Path
    manifest: PackageManifest
    entries: dict[str, Member] = field(repr=False)  # manifest.files plus the manifest member itself

    @property
    def id(self) -> str:
        return self.manifest.id

    def members(self, paths: Iterable[str] | None = None) -> Iterator[tuple[str, int, int, IO[bytes]]]:
        """(path, size, mode, reader) of the chosen members (all when None), in archive order.

        Each reader must be read to its end before the next member is taken; it raises
        ArchiveError at its end when the bytes are not the ones the manifest names.
        """
        wanted = set(self.entries) if paths is None else set(paths)
        unknown = sorted(wanted - set(self.entries))
        if unknown:
            raise ArchiveError(f"archive {self.path} has no member {unknown[0]!r} ({len(unknown)} unknown)")
        try:
            with tarfile.open(self.path, "r|gz") as tar:
                for info in tar:
                    if info.name in wanted:
                        entry = self.entries[info.name]
                        reader = tar.extractfile(info)
                        assert reader is not None  # verified regular files at open
                        checked = _Checked(reader, info.name, entry, self.path)
                        yield info.name, entry.size, entry.mode, cast(IO[bytes], checked)  # read() is all it has
                        if checked.left:  # a stream cannot go back for it
                            raise ArchiveError(f"{info.name} was not read to its end before the next member "
                                               "was taken (Package.members streams the archive once)")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise ArchiveError(f"archive {self.path} cannot be read ({exc}); run edgeftl package again") from exc

    def write_tar(self, paths: Iterable[str], fileobj: IO[bytes]) -> tuple[int, int]:
        """Stream an uncompressed tar of the chosen members to fileobj (a pipe is fine).

        Returns:
            (files, bytes) written.
        """
        files = size = 0
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, length, mode, reader in self.members(paths):
                tar.addfile(_tarinfo(path, length, mode), reader)
                files, size = files + 1, size + length
        return files, size

    def extract(self, folder: Path) -> int:
        """Extract every member (the manifest too) into folder, which must not exist; returns the file count.

        Written beside folder and renamed into place, so folder is complete or absent.
        """
        folder = Path(folder)
        if folder.exists():
            raise ArchiveError(f"{folder} already exists; extract into a new folder")
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        count = 0
        try:
            for path, _, mode, reader in self.members():
                dest = partial / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as handle:
                    shutil.copyfileobj(reader, handle)
                dest.chmod(mode)
                count += 1
            partial.rename(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return count


def open_archive(path: Path) -> Package:
    """Read a package archive and verify every member against its manifest before anything is used.

    Raises:
        ArchiveError: one line naming the archive and the first problem (unreadable, a link,
            device or unsafe path, a duplicate, a missing or extra member, a size, mode or
            sha256 that is not the manifest's).
    """
    path = Path(path)
    found, manifest_bytes = _scan(path)
    if manifest_bytes is None:
        raise ArchiveError(f"archive {path} has no {MANIFEST_NAME}: it is not an edgeftl package")
    try:
        manifest = PackageManifest.from_json(manifest_bytes)
    except ArchiveError as exc:
        raise ArchiveError(f"archive {path}: {exc}") from exc
    missing = sorted(set(manifest.files) - set(found))
    extra = sorted(set(found) - set(manifest.files))
    if missing:
        raise ArchiveError(f"archive {path}: {missing[0]} is in its manifest but not in the archive "
                           f"({len(missing)} missing): the archive is damaged; run edgeftl package again")
    if extra:
        raise ArchiveError(f"archive {path}: {extra[0]} is not in its manifest ({len(extra)} extra): "
                           "refusing an archive with members nobody vouched for; run edgeftl package again")
    for name, entry in sorted(manifest.files.items()):
        got = found[name]
        if got.sha256 != entry.sha256 or got.size != entry.size:
            raise ArchiveError(_mismatch(path, name, got.sha256, entry.sha256))
        if got.mode != entry.mode:
            raise ArchiveError(f"archive {path}: {name} has mode {oct(got.mode)}, its manifest says "
                               f"{oct(entry.mode)}: the archive is damaged; run edgeftl package again")
    own = Member(hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes), 0o644)
    return Package(path, manifest, {**manifest.files, MANIFEST_NAME: own})


class _Seen(NamedTuple):
    """A member as read (its mode is compared with the manifest's, not validated)."""

    sha256: str
    size: int
    mode: int


def _member_problem(info: tarfile.TarInfo, seen: bool) -> str | None:
    """Why a member may not be in a package (before its bytes are read), or None."""
    if problem := path_problem(info.name):
        return problem
    if not info.isreg():
        return f"member {info.name!r} is not a regular file (link, device or folder)"
    if seen:
        return f"member {info.name!r} appears twice"
    if info.name == MANIFEST_NAME and info.size > MAX_MANIFEST_BYTES:
        return f"{MANIFEST_NAME} is {info.size} bytes (at most {MAX_MANIFEST_BYTES})"
    return None


def _scan(path: Path) -> tuple[dict[str, _Seen], bytes | None]:
    """Every member's sha256, size and mode, and the manifest's bytes, in one streaming read."""
    found: dict[str, _Seen] = {}
    manifest: bytes | None = None
    try:
        with tarfile.open(path, "r|gz") as tar:
            for info in tar:
                problem = _member_problem(info, seen=info.name in found or (info.name == MANIFEST_NAME and
                                                                            manifest is not None))
                if problem:
                    raise ArchiveError(f"archive {path}: {problem}; refusing it")
                reader = tar.extractfile(info)
                assert reader is not None
                if info.name == MANIFEST_NAME:
                    manifest = reader.read()
                    continue
                digest = hashlib.sha256()
                while chunk := reader.read(1 << 20):
                    digest.update(chunk)
                found[info.name] = _Seen(digest.hexdigest(), info.size, info.mode)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"archive {path} cannot be read ({exc}); run edgeftl package again") from exc
    return found, manifest
