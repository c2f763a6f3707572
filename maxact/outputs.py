"""Where a command may write: never over one of its inputs or over a file of another kind, only
into a writable folder, and whole (a temporary beside the output, renamed into place)."""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from maxact.errors import OutputError

#: The file ``analyzer export`` writes into OUT_DIR: it marks the folder as an earlier export.
EXPORT_MARKER = "maxact-export.json"

#: kind -> (what it is: "file" or "folder", its name in messages, whether it replaces a folder whole).
KINDS = {
    "run": ("file", "a run file of `analyzer run`", False),
    "compare-torch": ("file", "a comparison file of `analyzer compare-torch`", False),
    "ranges": ("file", "an output of `analyzer ranges` in this --format", False),
    "eval": ("file", "an evaluation of `analyzer eval`", False),
    "quantized": ("file", "a quantised graph of `analyzer quantize` (or its decisions file)", False),
    "report": ("folder", "a report folder of `analyzer report`", False),
    "export": ("folder", "an export folder of `analyzer export`", True),
}


def _report_folder(path: Path) -> bool:
    try:
        with open(path / "index.html", "rb") as f:
            return b"<title>maxact report" in f.read(4096)
    except OSError:
        return False


#: Whether an existing path is a file or folder of a kind: here for the folders. The files (run,
#: compare-torch) are HDF5, which only the run-file module opens; it sits above this ground-level
#: module, so its recognisers (``maxact.analyzer.runfile.is_run_file``, ``is_comparison_file``)
#: are passed in by the caller (``recognise``), keeping imports going down.
_FOLDER_KINDS: dict[str, Callable[[Path], bool]] = {
    "report": lambda path: path.is_dir() and _report_folder(path),
    "export": lambda path: path.is_dir() and (path / EXPORT_MARKER).is_file(),
}


def is_kind(path: str | Path, kind: str, recognise: Callable[[Path], bool] | None = None) -> bool:
    """Whether the existing ``path`` is an output of ``kind`` (see :data:`KINDS`) that the
    command may replace: a file or folder maxact wrote, or an empty folder.

    Args:
        recognise: for a file kind, the test that ``path`` is a file of that kind.

    Raises:
        ValueError: a file kind without ``recognise`` (a programming error).
    """
    path = Path(path)
    if KINDS[kind][0] == "folder" and path.is_dir() and not any(path.iterdir()):
        return True
    if recognise is None and kind not in _FOLDER_KINDS:
        raise ValueError(f"is_kind({kind!r}) needs the recogniser of its files")
    return (recognise or _FOLDER_KINDS[kind])(path)


def _files(path: Path) -> list[Path]:
    """``path`` and, for a folder, every file under it; all resolved (links followed)."""
    found = [path.resolve()]
    if path.is_dir():
        found += [p.resolve() for p in path.rglob("*") if p.is_file()]
    return found


def _writable_folder(folder: Path) -> None:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"output folder {folder} {what}: give an output path in an existing folder")
    try:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd, probe = tempfile.mkstemp(prefix=".maxact-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable ({e.strerror}): give an output path in a "
                          "folder you can write") from None


def _not_input(path: Path, real: Path, given: Path, what: str, folder: bool, whole: bool) -> None:
    """Refuse the output ``path`` (resolved: ``real``) if it would replace the input ``given``
    (:func:`check_output`)."""
    for inp in _files(given):
        if real == inp or (path.exists() and inp.exists() and os.path.samefile(path, inp)):
            where = what if inp == given.resolve() else f"in {what} {given}"
            via = "" if path.absolute() == inp else f" (it resolves to {inp})"
            raise OutputError(f"output {path} is {where}, an input of this command{via}: give another output path "
                              "(inputs are never replaced)")
        if folder and whole and real in inp.parents:
            raise OutputError(f"output folder {path} holds {inp}, {what}, and would be replaced whole: give "
                              "another folder")
    if folder and given.is_dir() and given.resolve() in real.parents:
        raise OutputError(f"output folder {path} is inside {what} {given}, an input of this command: give a "
                          "folder outside it")


def check_output(path: str | Path, *, kind: str, inputs: Mapping[str, str | Path | Iterable[str | Path]],
                 force: bool = False, recognise: Callable[[Path], bool] | None = None) -> Path:
    """Check, before any work, that a command may write its output ``path``.

    Args:
        path: the output file (kinds ``run``, ``compare-torch``) or folder (``report``, ``export``).
        kind: what the command writes, a key of :data:`KINDS`.
        inputs: what each input is ("the model file") -> its path or paths: every file or folder
            the command reads (a folder stands for each file in it).
        force: allow replacing an existing file or folder of another kind (never an input).
        recognise: for the file kinds, the test that an existing file is of ``kind``
            (``maxact.analyzer.runfile.is_run_file``, ``is_comparison_file``,
            ``maxact.analyzer.ranges.is_ranges_file``, ``maxact.analyzer.evaluate.is_eval_file``), see :func:`is_kind`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: ``path`` is, or resolves through a link to, an input or a file in an input
            folder; a folder output inside an input folder, or holding an input (a kind replaced
            whole); a file output that is a folder, or a folder output that is a file; the folder
            that holds the output is missing or not writable; ``path`` exists and is not of ``kind``
            (:func:`is_kind`) and ``force`` is off.
    """
    path = Path(path)
    shape, what, whole = KINDS[kind]
    real = path.resolve()
    for role, paths in inputs.items():
        for given in [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]:
            _not_input(path, real, given, role, shape == "folder", whole)
    if shape == "file":
        if path.is_dir():
            raise OutputError(f"output {path} is a folder: give the file to write, e.g. {path / 'run.h5'}")
        _writable_folder(path.parent)
    else:
        if path.exists() and not path.is_dir():
            raise OutputError(f"output {path} is a file, not a folder: give the folder to write into")
        _writable_folder(path if path.is_dir() else path.parent)  # the folder itself may be new
    if path.exists() and not force and not is_kind(path, kind, recognise):
        raise OutputError(f"{path} exists and is not {what}: add --force to replace it, or give another path")
    return path


def temporary_path(path: str | Path) -> Path:
    """The temporary ``.NAME.PID.tmp`` beside ``path`` that this process writes ``path`` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: str | Path) -> None:
    """Remove the temporaries of ``path`` (:func:`temporary_path`) left by processes that are no
    longer running (killed while writing); those of a running process are kept."""
    path = Path(path)
    for name in glob.glob(glob.escape(str(path.with_name(f".{path.name}."))) + "*.tmp"):
        pid = name[len(str(path.parent / f".{path.name}.")):-len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            Path(name).unlink(missing_ok=True)
        except PermissionError:  # a running process of another user
            pass


def write_atomically(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` whole: into :func:`temporary_path`, synced, renamed over ``path``;
    then the stale temporaries of ``path`` are removed (:func:`remove_stale_temporaries`).

    Raises:
        OutputError: the write failed (a full disk, a quota, an I/O error); the temporary is
            removed and an earlier ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"could not write {path} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    remove_stale_temporaries(path)
