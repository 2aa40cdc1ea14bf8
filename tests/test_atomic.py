"""controlnet.atomic: a file or folder is complete under its name or absent, whatever happens to the writer."""

import subprocess
import sys

import pytest

from controlnet.atomic import atomic_path


def test_a_file_appears_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with atomic_path(path) as tmp:
        assert tmp.parent.parent == tmp_path and tmp.name == "out.json" and not tmp.exists()
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing changes at `path` before the block ends
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_folder_replaces_an_existing_one_whole(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "stale.bin").write_text("stale")
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_text("fresh")
    assert sorted(p.name for p in path.iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old folder went with the hidden one


def test_keep_and_error_leave_an_existing_result_alone(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    (path / "theirs").write_text("equal")
    with atomic_path(path, exists="keep") as tmp:
        tmp.mkdir()
        (tmp / "ours").write_text("equal")
    assert sorted(p.name for p in path.iterdir()) == ["theirs"]
    with pytest.raises(FileExistsError, match="cache: already exists"), atomic_path(path, exists="error") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in path.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    with pytest.raises(ValueError, match="exists='overwrite': expected one of replace, keep, error"):
        atomic_path(path, exists="overwrite").__enter__()


def test_a_killed_writer_leaves_only_a_hidden_leftover_with_its_prefix(tmp_path):
    code = (
        "import os, sys\n"
        "from controlnet.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1], prefix='.partial-', fsync=True) as tmp:\n"
        "    tmp.mkdir()\n"
        "    (tmp / 'a.bin').write_bytes(b'x' * 1000)\n"
        "    os._exit(9)  # killed mid-write: no finally block runs\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "step-1")], timeout=60)
    assert result.returncode == 9
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".partial-") and not (tmp_path / "step-1").exists()
