"""Writes that never lose data: every file fastdiff writes goes to a temporary name in the target's folder
and is renamed into place when complete.

A failed write (an exception, a full disk) leaves the previous file byte-identical and removes the
temporary file; a reader never sees a half-written file, because ``os.replace`` within one folder is
atomic on POSIX and Windows. A process killed outright (SIGKILL, power loss) can leave a temporary file
behind, never a partial target: temporaries are hidden files named ``.NAME.fastdiff-tmp-XXXXXXXX[.ext]``.

    check_output_path(path, "out")              # before any work: the folder exists, path is no folder
    with atomic_write(path) as f:               # a file object (binary by default)
        f.write(data)
    with atomic_path(path) as tmp:              # a temporary path with path's extension, for writers
        image.save(tmp)                         # that take a path (PIL, np.savez, safetensors)
    with atomic_files(path) as staged:          # a path in a staging folder, for writers that add
        program.save(staged, external_data=True)  # companion files (ONNX's external data, path + ".data")
    write_bytes(path, data); write_text(path, text); write_json(path, obj)
    create_exclusive(path, data)                # False (nothing written) when path exists already

``atomic_files`` keeps the file names the writer used, so references between the files (an ONNX graph
names its external-data file) stay right after the move; the companions move first and ``path`` last.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import IO, Iterator, Union

__all__ = ["TEMP_MARK", "check_output_path", "atomic_write", "atomic_path", "atomic_files", "write_bytes",
           "write_text", "write_json", "create_exclusive"]

PathLike = Union[str, os.PathLike]
TEMP_MARK = ".fastdiff-tmp-"


def check_output_path(path: PathLike, argument: str = "path") -> str:
    """``path`` as a string, after checking that a file can be written there: its folder exists and
    ``path`` is not a folder. Raises FileNotFoundError / IsADirectoryError / ValueError naming
    ``argument`` and the path; call it before any work."""
    if path is None or (isinstance(path, str) and not path.strip()):
        raise ValueError(f"{argument}: an output file path is needed, got {path!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{argument} must be a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{argument}: {path!r} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{argument}: the output folder {folder!r} does not exist (create it first)")
    return path


def _temp_name(path: str, keep_extension: bool) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1] if keep_extension else ""
    return os.path.join(folder, f".{name}{TEMP_MARK}{secrets.token_hex(4)}{ext}")


def _create(tmp: str) -> int:
    # mode 0o666 minus the umask, as open(path, "w") would give (mkstemp's 0o600 would make the result private)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def _fdopen(fd: int, mode: str) -> IO:
    """The file object over a fresh temporary file (tests replace it to simulate a failing disk)."""
    return os.fdopen(fd, mode)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: str, path: str) -> None:
    """Give ``tmp`` the old file's permission bits (if any), then rename it over ``path``."""
    if os.path.exists(path):
        with contextlib.suppress(OSError):
            shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@contextlib.contextmanager
def _published(tmp: str, path: str) -> Iterator[None]:
    """Around the writing of ``tmp``: on a clean exit ``tmp`` is renamed over ``path`` (and the folder
    fsynced); on an exception it is removed and ``path`` keeps its old content."""
    try:
        yield
        _publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", *, argument: str = "path") -> Iterator[IO]:
    """A file object on a temporary file next to ``path``; on a clean exit it is flushed, fsynced and
    renamed over ``path``; on an exception it is removed and ``path`` keeps its old content."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"mode must be 'w', 'wt' or 'wb', got {mode!r}")
    path = check_output_path(path, argument)
    tmp = _temp_name(path, keep_extension=False)
    fd = _create(tmp)
    try:
        f = _fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    with _published(tmp, path), f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: PathLike, *, argument: str = "path") -> Iterator[str]:
    """A temporary path next to ``path`` with the same extension (writers that pick a format from it, or
    append one, see the real one), for writers that take a path; renamed over ``path`` on a clean exit,
    removed on an exception. The writer must create exactly that file."""
    path = check_output_path(path, argument)
    tmp = _temp_name(path, keep_extension=True)
    os.close(_create(tmp))  # reserve the name
    with _published(tmp, path):
        yield tmp
        _fsync_file(tmp)


@contextlib.contextmanager
def atomic_files(path: PathLike, *, argument: str = "path") -> Iterator[str]:
    """A path with ``path``'s file name inside a fresh hidden staging folder next to ``path``, for a writer
    that also writes companion files beside it (an ONNX graph and its external data). On a clean exit
    every file the writer left in the staging folder is fsynced and moved next to ``path`` under the
    name it was written with (companions first, ``path`` last); on an exception the staging folder is
    removed and nothing next to ``path`` changes."""
    path = check_output_path(path, argument)
    folder, name = os.path.split(os.path.abspath(path))
    stage = os.path.join(folder, f".{name}{TEMP_MARK}{secrets.token_hex(4)}")
    os.mkdir(stage)
    try:
        yield os.path.join(stage, name)
        written = sorted(os.listdir(stage))
        if name not in written:
            raise FileNotFoundError(f"{argument}: the writer did not create {name!r}")
        for entry in written:
            if not os.path.isfile(os.path.join(stage, entry)):
                raise ValueError(f"{argument}: the writer left a non-file {entry!r}; only files are moved")
            _fsync_file(os.path.join(stage, entry))
        for entry in [e for e in written if e != name] + [name]:
            _publish(os.path.join(stage, entry), os.path.join(folder, entry))
        _fsync_folder(folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_bytes(path: PathLike, data: bytes, *, argument: str = "path") -> str:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb", argument=argument) as f:
        f.write(data)
    return os.fspath(path)


def write_text(path: PathLike, text: str, *, argument: str = "path") -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"), argument=argument)


def write_json(path: PathLike, obj, *, indent: int = 1, argument: str = "path") -> str:
    """Write ``obj`` as JSON to ``path`` atomically (serialised before the file is touched)."""
    return write_text(path, json.dumps(obj, indent=indent), argument=argument)


def create_exclusive(path: PathLike, data: bytes, *, argument: str = "path") -> bool:
    """Create ``path`` holding ``data`` only if it does not exist, atomically (a complete temporary file
    hard-linked to the name: two processes racing, exactly one wins and no reader sees it partial).
    Returns False, writing nothing, when ``path`` exists."""
    path = check_output_path(path, argument)
    tmp = _temp_name(path, keep_extension=False)
    fd = _create(tmp)
    try:
        with _fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then the content
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                return False
            os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))
        return True
    finally:
        _remove(tmp)
