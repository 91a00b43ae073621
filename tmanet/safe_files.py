"""Writing outputs without ever destroying a user's file.

Every command writes through these few primitives:

- :func:`check_output` before any work: the output can be created where asked (its folder is a folder and
  writable, a file output is not an existing folder and vice versa), so a bad path fails in one line, early.
- :func:`refuse_overwriting_inputs` before anything is opened for writing: no output is one of the command's
  inputs (compared by resolved path and by inode, so symlinks, hard links and ``./x`` spellings all count),
  and no output folder holds an input (a folder output replaces the whole folder).
- :func:`atomic_file` / :func:`write_text` / :func:`write_json`: a file is written under a temporary name in
  its own folder and renamed into place when complete; on an error (or a signal turned into an exception) the
  temporary file is removed and the previous file, if any, is untouched.
- :func:`atomic_directory` / :class:`PendingDirectory`: a folder is staged beside its destination and swapped in
  when complete, so the previous folder stays usable until the new one is whole.

A ``kill -9`` cannot run cleanup: it may leave a hidden ``.NAME.partial-*`` beside the output, never a
truncated file under the final name.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

PARTIAL_MARK = ".partial-"


class OutputError(UserError):
    """An output path cannot be written, or would overwrite one of the command's inputs."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        p = p.parent
    return p


def check_output(path, kind: str = "file", what: str = "output") -> Path:
    """Raise :class:`OutputError` unless ``path`` can be written as a ``kind`` ('file' or 'dir') output.

    The nearest existing ancestor must be a writable folder (missing folders below it are created when the
    output is written); an existing file output must not be a folder, an existing folder output not a file."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    if not str(path):
        raise OutputError(f"{what}: empty path")
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputError(f"{what} {path} is an existing folder: give a file name")
        if kind == "dir" and not path.is_dir():
            raise OutputError(f"{what} {path} is an existing file, not a folder")
    base = _nearest_existing(path.parent if not path.exists() else path)
    if base != path and not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a folder")
    folder = base if base.is_dir() else base.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write in {folder} (permission denied)")
    return path


def _identity(path: Path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_overwriting_inputs(outputs: Iterable, inputs: Iterable, whole: bool = True) -> None:
    """Raise :class:`OutputError` if writing ``outputs`` could destroy one of ``inputs``.

    ``outputs`` and ``inputs`` are paths (None entries are ignored). An output conflicts with an input when
    both name the same file or folder (same resolved path, or same device and inode: symlinks, hard links,
    ``./x`` spellings), when the input is a folder (an export, an image folder) and the output an existing
    file directly in it, and, with ``whole`` (an output folder is replaced as a whole), when the input lies
    inside the output. Two outputs naming the same file conflict too."""
    outs = [Path(o) for o in outputs if o is not None]
    ins = [Path(i) for i in inputs if i is not None]
    seen = {}
    for out in outs:
        out_real = Path(os.path.realpath(out))
        if out_real in seen:
            raise OutputError(f"outputs {seen[out_real]} and {out} are the same file: give each its own path")
        seen[out_real] = out
        out_id = _identity(out)
        for inp in ins:
            in_real = Path(os.path.realpath(inp))
            same = in_real == out_real or (out_id is not None and out_id == _identity(inp))
            if same or (whole and _inside(in_real, out_real)):
                raise OutputError(f"output {out} {'is' if same else 'contains'} the input {inp}: refusing to "
                                  "overwrite it (choose another output path)")
            if out_real.parent == in_real and in_real.is_dir() and out_real.is_file():
                raise OutputError(f"output {out} is a file of the input folder {inp}: refusing to overwrite it "
                                  "(choose another output path)")


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; the ones created, deepest first (for :func:`_remove_made`)."""
    missing = []
    p = path.parent
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {path.parent} for {path}: {e.strerror or e}") from None
    return missing


def _remove_made(folders: list[Path]):
    """Remove folders :func:`_make_parents` created, if still empty: a failed output leaves no empty folder."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _temporary_name(path: Path) -> tuple[Path, list[Path]]:
    """A fresh hidden file beside ``path`` with its suffix kept (writers pick the format by the suffix), and the
    folders created for it."""
    made = _make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}{PARTIAL_MARK}", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        _remove_made(made)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    _publishable(Path(tmp), 0o666)
    return Path(tmp), made


def _publishable(path: Path, mode: int):
    """mkstemp/mkdtemp create private files (0600/0700): a published output gets the usual umask mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """``with atomic_file("out.mp4") as tmp:`` write the whole file at ``tmp`` (same folder, same suffix);
    on leaving the block normally it is renamed to ``path``, on an exception it is removed."""
    path = Path(path)
    tmp, made = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_made(made)
        raise


class PendingFile:
    """A file being written for longer than a ``with`` block (e.g. frame by frame): :attr:`tmp` is written,
    :meth:`commit` renames it to :attr:`path`, :meth:`discard` removes it. Both are idempotent."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp, self._made = _temporary_name(self.path)
        self.done = False

    def commit(self):
        if not self.done:
            os.replace(self.tmp, self.path)
            self.done = True

    def discard(self):
        if not self.done:
            self.tmp.unlink(missing_ok=True)
            _remove_made(self._made)
            self.done = True


def write_bytes(path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path, obj, **dumps_options) -> Path:
    """``obj`` as JSON (``indent=1`` unless told otherwise), atomically."""
    dumps_options.setdefault("indent", 1)
    return write_text(path, json.dumps(obj, **dumps_options) + "\n")


def write_text_if_changed(path, text: str) -> bool:
    """Write only when the content differs: an unchanged file keeps its bytes and mtime. True if written."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)
    return True


# -- folders ------------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_into_place(staged: Path, path: Path):
    """Move the complete folder ``staged`` to ``path``; a previous ``path`` is replaced in one atomic swap where
    the OS allows (else renamed aside first) and then deleted."""
    if not path.exists():
        os.replace(staged, path)
        return
    if _exchange(staged, path):
        shutil.rmtree(staged)  # now holds the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.replace(path, old)
    os.replace(staged, path)
    shutil.rmtree(old, ignore_errors=True)


class PendingDirectory:
    """A folder filled for longer than a ``with`` block (e.g. one file per frame): :attr:`stage` (beside
    :attr:`path`) is filled, :meth:`commit` swaps it in for ``path`` (the previous folder stays whole until
    then), :meth:`discard` deletes it and leaves ``path`` untouched. Both are idempotent."""

    def __init__(self, path):
        self.path = Path(path)
        self._made = _make_parents(self.path)
        try:
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}{PARTIAL_MARK}", dir=self.path.parent))
        except OSError as e:
            _remove_made(self._made)
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        _publishable(self.stage, 0o777)
        self.done = False

    def commit(self):
        if not self.done:
            swap_into_place(self.stage, self.path)
            self.done = True

    def discard(self):
        if not self.done:
            shutil.rmtree(self.stage, ignore_errors=True)
            _remove_made(self._made)
            self.done = True


@contextmanager
def atomic_directory(path) -> Iterator[Path]:
    """``with atomic_directory("exports/city") as stage:`` fill the folder ``stage`` (beside ``path``); on
    leaving the block normally it replaces ``path`` (the old folder stays whole until then), on an exception
    it is deleted and ``path`` is untouched."""
    pending = PendingDirectory(path)
    try:
        yield pending.stage
        pending.commit()
    except BaseException:
        pending.discard()
        raise
