"""`hf_koopman.files`: files written whole or not at all, and safetensors files told apart from cut-short ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_koopman.files import (
    move_into_place,
    safetensors_error,
    staging_folder,
    unreadable_safetensors,
    write_text_whole,
)
from hf_koopman.risk import RiskEstimator, load_estimator


def test_write_text_whole_replaces_the_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    write_text_whole(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["record.json"]


def test_a_failed_write_leaves_the_earlier_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    path.write_text("old")
    original = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        original(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space"):
        write_text_whole(path, "a new record, longer than the old one", partial_prefix="_")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["record.json"]


def test_a_fitted_estimator_saved_over_an_earlier_one_is_written_whole(tmp_path, monkeypatch):
    path = load_estimator(None).save_json(tmp_path / "estimator.json")
    before = path.read_text()
    original = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        original(self, text[:100], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        load_estimator(None).save_json(path)
    monkeypatch.undo()
    assert path.read_text() == before and RiskEstimator.from_json(path).coef == load_estimator(None).coef


def test_move_into_place_moves_new_files_and_removes_stale_ones(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "plot.png").write_text("old plot")
    (tmp_path / "mine.txt").write_text("the user's")
    with staging_folder(tmp_path, ".stage-") as staging:
        (staging / "a.txt").write_text("new a")
        move_into_place(staging, tmp_path, ["a.txt"], stale=["plot.png"])
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "mine.txt"]
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "mine.txt").read_text() == "the user's"


def _second_placement_fails(folder: Path):
    """An `os.replace` under which the second file moved into `folder` fails (a full disk): the first is in place."""
    real, placed = os.replace, []

    def replace(src, dst):
        if os.path.dirname(os.fspath(dst)) == os.fspath(folder):
            placed.append(dst)
            if len(placed) == 2:
                raise OSError("disk full")
        return real(src, dst)

    return replace


def test_a_failed_move_puts_everything_back(tmp_path, monkeypatch):
    for name in ("a.txt", "b.txt", "plot.png"):
        (tmp_path / name).write_text(f"old {name}")
    replace = _second_placement_fails(tmp_path)
    with pytest.raises(OSError, match="disk full"), staging_folder(tmp_path, ".stage-") as staging:
        for name in ("a.txt", "b.txt"):
            (staging / name).write_text(f"new {name}")
        monkeypatch.setattr(os, "replace", replace)
        move_into_place(staging, tmp_path, ["a.txt", "b.txt"], stale=["plot.png"])
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_text() for p in os.listdir(tmp_path)} == {
        "a.txt": "old a.txt", "b.txt": "old b.txt", "plot.png": "old plot.png"}


def test_a_failed_move_removes_a_new_file_that_had_no_earlier_version(tmp_path, monkeypatch):
    (tmp_path / "profile.json").write_text("old profile")
    replace = _second_placement_fails(tmp_path)  # the new plot (no earlier one) moves into place, the profile cannot
    with pytest.raises(OSError, match="disk full"), staging_folder(tmp_path, ".stage-") as staging:
        for name in ("eigenvalues.png", "profile.json"):
            (staging / name).write_text(f"new {name}")
        monkeypatch.setattr(os, "replace", replace)
        move_into_place(staging, tmp_path, ["eigenvalues.png", "profile.json"])
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_text() for p in os.listdir(tmp_path)} == {"profile.json": "old profile"}


def test_a_stale_staging_folder_of_a_killed_write_is_removed_and_a_running_one_kept(tmp_path):
    stale, running = tmp_path / ".stage-killed", tmp_path / ".stage-running"
    stale.mkdir()
    running.mkdir()
    os.utime(stale, (0, 0))
    with staging_folder(tmp_path, ".stage-") as staging:
        assert staging.is_dir()
    assert not stale.exists() and running.is_dir() and not staging.exists()


def test_safetensors_error_tells_a_readable_file_from_a_cut_short_one(tmp_path):
    good = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:1000])
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    assert safetensors_error(good) is None
    for bad in (cut, empty, folder):
        err = safetensors_error(bad)
        assert err is not None, bad
        message = unreadable_safetensors(bad, err)
        assert str(bad) in message and "truncated or corrupt" in message and "save_pretrained" in message


def test_write_text_whole_keeps_the_permissions_and_writes_through_a_link(tmp_path):
    target = tmp_path / "elsewhere" / "estimator.json"
    target.parent.mkdir()
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "estimator.json"
    link.symlink_to(target)
    write_text_whole(link, "new")
    assert link.is_symlink() and target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o640
    assert sorted(os.listdir(target.parent)) == ["estimator.json"]


def test_two_writers_of_one_file_do_not_share_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    names = []
    original = Path.write_text

    def remember(self, text, *args, **kwargs):
        names.append(self.name)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", remember)
    write_text_whole(path, "one")
    write_text_whole(path, "two")
    assert len(set(names)) == 2 and path.read_text() == "two"
