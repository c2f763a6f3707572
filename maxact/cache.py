"""The set-up cache: a content-addressed folder of work a run would otherwise redo (onnxruntime's
optimised graph, the symbolic shape inference), each entry written whole or not at all, checked
against its manifest before use, the least recently used evicted past a size bound.

The folder is ``$MAXACT_CACHE_DIR``, else ``$XDG_CACHE_HOME/maxact``, else ``~/.cache/maxact``;
``MAXACT_CACHE=0`` turns the cache off, ``MAXACT_CACHE_MAX_BYTES`` bounds it (default 4 GiB).
An entry is the folder ``entries/KEY`` (KEY: :func:`cache_key` of everything that changes it) with
``manifest.json`` (each file's size and sha256). It is built in ``tmp/`` and renamed into place,
so a reader sees a whole entry or none, and of two writers of one key the first rename wins. A
cache that cannot be written (a read-only folder, a full disk) warns once and is not used again
in the process: it never fails a run.

``hashes/`` remembers the sha256 of files already read (the model's files, the entries' own),
each under its file's identity: device, inode, size, and modification and status-change times in
nanoseconds. Any write to a file changes its status-change time, which no program can set back
(``touch`` and ``os.utime`` set the other two), so a changed file is always read again, as git's
index and ccache's manifests assume; a 540 MB model is then hashed once, not at every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Bumped when the layout of an entry changes: older entries are then never found.
FORMAT = 1
DEFAULT_MAX_BYTES = 4 << 30
MANIFEST = "manifest.json"
#: Temporary folders left by a writer that died are removed after this many seconds.
_STALE_TMP_SECONDS = 24 * 3600
#: A file changed less than this long ago (ns) has its sha256 read, not remembered (git's "racy" files).
_RACY_NS = 2_000_000_000

log = logging.getLogger(__name__)
#: What the caches of this process did: ``hit``, ``miss``, ``write``, ``refused``, ``evicted``.
COUNTS: Counter[str] = Counter()
_warned: set[str] = set()


def _warn(message: str) -> None:
    """One line on stderr, once per message and process."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def default_folder() -> Path:
    """``$MAXACT_CACHE_DIR``, else ``$XDG_CACHE_HOME/maxact``, else ``~/.cache/maxact``."""
    if os.environ.get("MAXACT_CACHE_DIR"):
        return Path(os.environ["MAXACT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maxact"


def cache_key(*parts: object) -> str:
    """The hex sha256 of ``parts`` (JSON-serialisable values) and the cache's :data:`FORMAT`."""
    text = json.dumps([FORMAT, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


#: The bytes :func:`file_sha256` reads at a time. hashlib's own ``file_digest`` reads 256 KiB,
#: and each read takes the interpreter lock back: in a thread beside Python code (the model
#: loaded or discovered meanwhile) it waited for the lock at every read, and SmolLM2-135M's 540 MB
#: took 21 s instead of 0.4 s (0.75 s in 16 MiB reads).
_HASH_CHUNK = 1 << 24


def file_sha256(path: Path, memo: Cache | None = None) -> str:
    """The hex sha256 of a file's bytes, read in :data:`_HASH_CHUNK` chunks; with ``memo``,
    remembered there under the file's identity (:meth:`Cache.known_sha256`), so an unchanged file
    is read once.

    Raises:
        OSError: the file cannot be read.
    """
    if memo is not None:
        return memo.known_sha256(Path(path))
    digest, buffer = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while read := f.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def _identity(path: Path) -> str:
    """What names a file's current bytes without reading them: its device, inode, size, and
    modification and status-change times (ns); any write changes the last, a rename none."""
    st = os.stat(path)
    return f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


@dataclass(frozen=True)
class CacheInfo:
    """What a cache folder holds: its path, entries and bytes (temporary folders included)."""

    folder: Path
    entries: int
    bytes: int


class Cache:
    """A cache folder (see the module's text).

    Args:
        folder: the cache folder (made when first written).
        max_bytes: the size bound; entries beyond it are evicted, least recently used first.
    """

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.usable = True

    @property
    def _entries(self) -> Path:
        return self.folder / "entries"

    @property
    def _tmp(self) -> Path:
        return self.folder / "tmp"

    @property
    def _hashes(self) -> Path:
        return self.folder / "hashes"

    def known_sha256(self, path: Path, settled: bool = False) -> str:
        """The hex sha256 of the file ``path``: the one remembered for its identity (see the module's
        text), else read and remembered (a memo that cannot be written is only not kept). A file
        changed in the last :data:`_RACY_NS` is not remembered unless ``settled`` says that nothing
        writes it any more (an entry's own files, closed before they are hashed).

        Raises:
            OSError: the file cannot be read.
        """
        before = _identity(path)
        known = self._remembered(before)
        if known is not None:
            return known
        digest = file_sha256(path)
        changed = int(before.rsplit("|", 1)[1])
        # Kept only for a file unchanged while read, and last changed a while ago: a write in the
        # same tick of the file system's clock could leave every part of its identity as it was.
        if self.usable and _identity(path) == before and (settled or time.time_ns() - changed > _RACY_NS):
            tmp = None
            try:
                self._hashes.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self._hashes, prefix=".tmp-")
                with os.fdopen(fd, "w") as f:
                    f.write(digest)
                os.replace(tmp, self._memo(before))
            except OSError:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        return digest

    def remembered_sha256(self, path: Path) -> str | None:
        """The sha256 :meth:`known_sha256` remembers for the file ``path`` as it is now, without
        reading the file; None where none is remembered (or the file cannot be read)."""
        try:
            return self._remembered(_identity(path))
        except OSError:
            return None

    def _memo(self, identity: str) -> Path:
        return self._hashes / hashlib.sha256(identity.encode()).hexdigest()

    def _remembered(self, identity: str) -> str | None:
        with contextlib.suppress(OSError, ValueError):
            known = self._memo(identity).read_text()
            if re.fullmatch("[0-9a-f]{64}", known):
                return known
        return None

    def _unusable(self, e: OSError) -> None:
        self.usable = False
        _warn(f"the set-up cache {self.folder} cannot be written ({e.strerror or e}): running without it "
              "(set MAXACT_CACHE_DIR to a writable folder, or MAXACT_CACHE=0)")

    def get(self, key: str) -> Path | None:
        """The folder of entry ``key``, checked against its manifest; None where there is none.

        An entry whose files differ from its manifest is deleted with a warning (None is returned:
        the caller builds it again). Using an entry makes it the most recently used.
        """
        entry = self._entries / key
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError):
            COUNTS["miss"] += 1
            return None
        except (OSError, ValueError) as e:
            return self.refuse(key, f"its manifest cannot be read ({e})")
        why = _differs(entry, manifest.get("files", {}), self)
        if why:
            return self.refuse(key, why)
        with contextlib.suppress(OSError):  # a read-only cache still serves its entries
            os.utime(entry / MANIFEST)
        COUNTS["hit"] += 1
        log.info("set-up cache hit %s", key)
        return entry

    def _settled_sha256(self, path: Path) -> str:
        return file_sha256(path) if not self.usable else self.known_sha256(path, settled=True)

    def refuse(self, key: str, why: str) -> None:
        """Delete entry ``key`` with a warning saying ``why`` (e.g. onnxruntime cannot load it);
        returns None, what :meth:`get` gives for it."""
        COUNTS["refused"] += 1
        _warn(f"set-up cache entry {key[:12]} in {self.folder} is refused ({why}): deleted, building it again")
        self._delete(self._entries / key)
        return None

    def forget(self, key: str) -> None:
        """Delete entry ``key``, silently (it is out of date, not damaged)."""
        self._delete(self._entries / key)

    def begin(self) -> Path | None:
        """A new empty folder to build an entry in (then :meth:`commit` or :meth:`discard` it);
        None where the cache cannot be written (warned once)."""
        if not self.usable:
            return None
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="entry-", dir=self._tmp))
        except OSError as e:
            self._unusable(e)
            return None

    def commit(self, folder: Path, key: str) -> bool:
        """Make ``folder`` (from :meth:`begin`) entry ``key``: its manifest written, renamed into
        place (where another writer was first, theirs is kept), then the cache bounded; returns
        whether the entry is there. A failure (a full disk) warns once and leaves no part of the entry."""
        try:
            files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": self._settled_sha256(p)}
                     for p in sorted(folder.rglob("*")) if p.is_file()}
            (folder / MANIFEST).write_text(json.dumps({"key": key, "files": files}, indent=1))
            self._entries.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(folder, self._entries / key)
            except OSError:
                if not (self._entries / key / MANIFEST).is_file():
                    raise
                self.discard(folder)  # another process wrote the same entry first
                return True
        except OSError as e:
            self.abandon(folder, e)
            return False
        COUNTS["write"] += 1
        log.info("set-up cache write %s", key)
        self.evict(keep=key)
        return (self._entries / key).is_dir()  # unless beyond the bound itself

    def discard(self, folder: Path) -> None:
        """Remove a folder of :meth:`begin` that is not to become an entry."""
        shutil.rmtree(folder, ignore_errors=True)

    def abandon(self, folder: Path, error: OSError) -> None:
        """Remove a folder of :meth:`begin` that could not be written (``error``), and warn once:
        the cache is not written again in this process."""
        self.discard(folder)
        self._unusable(error)

    def read_json(self, key: str) -> object | None:
        """The JSON value stored under ``key`` (:meth:`write_json`), or None."""
        entry = self.get(key)
        if entry is None:
            return None
        try:
            return json.loads((entry / "value.json").read_text())
        except (OSError, ValueError) as e:
            return self.refuse(key, f"its value cannot be read ({e})")

    def write_json(self, key: str, value: object) -> None:
        """Store the JSON value ``value`` under ``key`` (a failure warns once)."""
        folder = self.begin()
        if folder is None:
            return
        try:
            (folder / "value.json").write_text(json.dumps(value))
        except OSError as e:
            self.abandon(folder, e)
            return
        self.commit(folder, key)

    def _listing(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, folder) of every entry."""
        found = []
        for entry in self._entries.iterdir() if self._entries.is_dir() else ():
            with contextlib.suppress(OSError):
                found.append(((entry / MANIFEST).stat().st_mtime, _size(entry), entry))
        return sorted(found)

    def evict(self, keep: str | None = None) -> int:
        """Delete the least recently used entries until the cache holds at most ``max_bytes``
        (``keep`` last of all), and temporary folders a dead writer left; returns entries deleted."""
        for tmp in self._tmp.iterdir() if self._tmp.is_dir() else ():
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    self._delete(tmp)
        listing = self._listing()
        listing.sort(key=lambda e: (e[2].name == keep, e[0]))
        total, deleted = sum(size for _, size, _ in listing), 0
        for _, size, entry in listing:
            if total <= self.max_bytes:
                break
            self._delete(entry)
            total -= size
            deleted += 1
        COUNTS["evicted"] += deleted
        return deleted

    def _delete(self, path: Path) -> None:
        """Rename ``path`` out of the way first (a reader never sees half of it), then remove it."""
        gone = None
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            gone = Path(tempfile.mkdtemp(prefix="gone-", dir=self._tmp))
            os.rename(path, gone / "entry")
        except OSError:
            shutil.rmtree(path, ignore_errors=True)  # in place, then
        if gone is not None:
            shutil.rmtree(gone, ignore_errors=True)

    def info(self) -> CacheInfo:
        """The folder, its entries and their bytes (temporary folders counted in the bytes)."""
        listing = self._listing()
        return CacheInfo(self.folder, len(listing),
                         sum(size for _, size, _ in listing) + _size(self._tmp) + _size(self._hashes))

    def clear(self) -> CacheInfo:
        """Delete every entry and temporary folder; returns what there was (:meth:`info`).

        Raises:
            OSError: the folder cannot be emptied (e.g. read-only).
        """
        before = self.info()
        for part in (self._entries, self._tmp, self._hashes):
            if part.exists():
                shutil.rmtree(part)
        return before


def _size(folder: Path) -> int:
    """The bytes of the files under ``folder`` (0 where there is none; files that go meanwhile left out)."""
    total = 0
    for p in folder.rglob("*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


def _differs(entry: Path, files: dict[str, dict[str, object]], memo: Cache) -> str | None:
    """Why the files of ``entry`` differ from its manifest (None: they match)."""
    present = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(files):
        return f"its files {sorted(present ^ set(files))[:3]} differ from its manifest"
    for name, want in files.items():
        path = entry / name
        try:
            if path.stat().st_size != want.get("size") or file_sha256(path, memo) != want.get("sha256"):
                return f"{name} differs from its manifest"
        except OSError as e:
            return f"{name} cannot be read ({e})"
    return None


def open_cache(enabled: bool = True) -> Cache | None:
    """The cache of :func:`default_folder`, bounded by ``MAXACT_CACHE_MAX_BYTES``; None where
    ``enabled`` is off (``--no-cache``) or ``MAXACT_CACHE=0``."""
    if not enabled or os.environ.get("MAXACT_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    limit = os.environ.get("MAXACT_CACHE_MAX_BYTES", "")
    try:
        max_bytes = int(limit) if limit.strip() else DEFAULT_MAX_BYTES
    except ValueError:
        _warn(f"MAXACT_CACHE_MAX_BYTES={limit!r} is not a number of bytes: using {DEFAULT_MAX_BYTES}")
        max_bytes = DEFAULT_MAX_BYTES
    return Cache(default_folder(), max_bytes)

