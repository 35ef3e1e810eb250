"""One resolver for the offline data folder, shared by the graph, text and image readers."""

from __future__ import annotations

import pytest

from research.data.data_dir import DataDirNotFoundError, resolve_data_dir
from research.data.graphs import load_gin_graphs
from research.experiments.tasks import resolve_data_dir as tasks_resolver


def test_explicit_folder_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KOOPMAN_DATA", str(tmp_path / "elsewhere"))
    assert resolve_data_dir(tmp_path) == tmp_path
    assert tasks_resolver is resolve_data_dir  # the experiments readers use the same function


def test_missing_folder_names_both_fixes_and_is_both_error_types(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_KOOPMAN_DATA", raising=False)
    with pytest.raises(DataDirNotFoundError, match="HF_KOOPMAN_DATA"):
        resolve_data_dir(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="data_dir="):  # the graph readers' historical contract
        load_gin_graphs(None, "MUTAG")
