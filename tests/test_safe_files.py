"""tmanet.safe_files: outputs never replace inputs, and never appear half-written under their final name."""
import os
from pathlib import Path

import pytest

from tmanet.safe_files import (OutputError, PendingFile, atomic_directory, atomic_file, check_output,
                               refuse_overwriting_inputs, write_text_if_changed)


def test_every_spelling_of_an_input_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.npy").write_bytes(b"x")
    os.link("a.npy", "hard.npy")
    os.symlink("a.npy", "soft.npy")
    for out in ("a.npy", "./a.npy", "hard.npy", "soft.npy", str(tmp_path / "a.npy"), "d/../a.npy"):
        with pytest.raises(OutputError, match="is the input a.npy"):
            refuse_overwriting_inputs([out], ["a.npy"])
    refuse_overwriting_inputs(["b.npy", None], ["a.npy", None])
    Path("d").mkdir()
    Path("d/ck.pth").write_bytes(b"c")
    with pytest.raises(OutputError, match="contains the input d/ck.pth"):
        refuse_overwriting_inputs(["d"], ["d/ck.pth"])
    refuse_overwriting_inputs(["d"], ["d/ck.pth"], whole=False)   # files are added to d, d is not replaced
    with pytest.raises(OutputError, match="is a file of the input folder d"):
        refuse_overwriting_inputs(["d/ck.pth"], ["d"])
    refuse_overwriting_inputs(["d/new.json"], ["d"])
    with pytest.raises(OutputError, match="are the same file"):
        refuse_overwriting_inputs(["x.npy", "./x.npy"], [])


def test_check_output(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is an existing folder"):
        check_output(tmp_path / "d", "file")
    with pytest.raises(OutputError, match="is an existing file, not a folder"):
        check_output(tmp_path / "f", "dir")
    with pytest.raises(OutputError, match="f is a file, not a folder"):
        check_output(tmp_path / "f" / "deeper" / "x.mp4")
    check_output(tmp_path / "new" / "deeper" / "x.mp4")
    check_output(tmp_path / "f")   # an existing file output is replaced as a whole, atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


def test_atomic_file_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp.name.startswith(".out.partial-")
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_pending_file_discard_removes_the_folders_it_made(tmp_path):
    pending = PendingFile(tmp_path / "a" / "b" / "l.npy")
    pending.tmp.write_bytes(b"partial")
    pending.discard()
    pending.discard()
    assert list(tmp_path.iterdir()) == []
    pending = PendingFile(tmp_path / "a" / "l.npy")
    pending.tmp.write_bytes(b"whole")
    pending.commit()
    assert (tmp_path / "a" / "l.npy").read_bytes() == b"whole" and os.listdir(tmp_path / "a") == ["l.npy"]


def test_write_text_if_changed_leaves_an_unchanged_file_alone(tmp_path):
    path = tmp_path / "engines.json"
    assert write_text_if_changed(path, "{}\n")
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert not write_text_if_changed(path, "{}\n")
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert write_text_if_changed(path, "{\"a\": 1}\n") and path.read_text() == "{\"a\": 1}\n"


def test_atomic_directory_swaps_only_when_complete(tmp_path):
    export = tmp_path / "exp"
    export.mkdir()
    (export / "manifest.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(export) as stage:
            (stage / "manifest.json").write_text("new, half done")
            assert (export / "manifest.json").read_text() == "old"
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["exp"] and (export / "manifest.json").read_text() == "old"
    with atomic_directory(export) as stage:
        (stage / "manifest.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["exp"] and (export / "manifest.json").read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert export.stat().st_mode & 0o777 == 0o777 & ~umask   # published with the umask's mode, not mkdtemp's 0700
