"""TU graph loading / folds / collation, the training script's smoke mode and the committed reference checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from research.data.graphs import (
    GraphDataset,
    collate_graphs,
    graph_to_tensor,
    load_gin_graphs,
    stratified_kfold,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

GIN_TEXT = """3
3 1
0 2 1 2
1 1 0
0 1 0
2 0
2 1 1
2 1 0
4 1
0 1 1
0 2 0 2
1 2 1 3 7.5 0.1
1 1 2
"""


@pytest.fixture()
def tiny_gin(tmp_path):
    folder = tmp_path / "graphs" / "TOY"
    folder.mkdir(parents=True)
    (folder / "TOY.txt").write_text(GIN_TEXT)
    return tmp_path


def test_gin_parsing_and_tensor(tiny_gin):
    graphs, num_classes, num_labels = load_gin_graphs(tiny_gin, "TOY")
    assert [g.num_nodes for g in graphs] == [3, 2, 4]
    assert [g.label for g in graphs] == [1, 0, 1] and num_classes == 2 and num_labels == 3
    T = graph_to_tensor(graphs[0], num_labels)  # star centred on node 0: degrees 2, 1, 1
    assert T.shape == (4, 3, 3)
    torch.testing.assert_close(T[0, 0, 1], torch.tensor(1 / 2**0.5))
    assert T[0, 1, 2] == 0 and T[0].equal(T[0].T)
    # node labels one-hot on the diagonal of channels 1.. (plus the adjacency, as in the reference pipeline)
    assert T[1 + 0, 0, 0] == 1 and T[1 + 1, 1, 1] == 1 and T[1 + 1, 0, 0] == 0
    # the trailing attributes of the 3rd graph's node 2 are ignored
    assert graphs[2].edges.shape[1] == 6


def test_gin_parsing_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_gin_graphs(tmp_path, "MISSING")
    bad = tmp_path / "graphs" / "BAD"
    bad.mkdir(parents=True)
    (bad / "BAD.txt").write_text("1\n2 0\n0 1 5\n0 0\n")
    with pytest.raises(ValueError, match="neighbour"):
        load_gin_graphs(tmp_path, "BAD")


def test_stratified_folds_partition_and_balance():
    labels = [0] * 30 + [1] * 20
    folds = stratified_kfold(labels, 10, seed=3)
    tests = [i for _, test in folds for i in test]
    assert sorted(tests) == list(range(50))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == 50
        assert sum(labels[i] for i in test) == 2  # 20 positives over 10 folds
    assert stratified_kfold(labels, 10, seed=3) == folds
    assert stratified_kfold(labels, 10, seed=4) != folds


def test_collate_pads_and_masks(tiny_gin):
    graphs, _, num_labels = load_gin_graphs(tiny_gin, "TOY")
    ds = GraphDataset(graphs, num_labels)
    batch = collate_graphs([ds[0], ds[1], ds[2]])
    assert batch["graph_tensor"].shape == (3, 4, 4, 4)
    assert batch["node_mask"].sum(1).tolist() == [3, 2, 4]
    assert batch["labels"].tolist() == [1, 0, 1]
    assert (batch["graph_tensor"][1, :, 2:, :] == 0).all()


@pytest.mark.data
def test_real_tu_data(data_dir):
    graphs, num_classes, num_labels = load_gin_graphs(data_dir, "MUTAG")
    assert len(graphs) == 188 and num_classes == 2 and num_labels == 7


@pytest.mark.data
def test_train_script_quick(data_dir, tmp_path):
    out, ckpt = tmp_path / "results", tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_KOOPMAN_DATA": str(data_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "research.scripts.train_reynet", "all", "--quick",
         "--output-dir", str(out), "--checkpoint-dir", str(ckpt)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "reynet_summary.json").read_text())
    assert set(summary["synthetic"]["mse"]) == {"symmetry", "diagonal", "power", "trace"}
    assert set(summary["graphs"]["datasets"]["MUTAG"]["models"]) == {"reynet", "iegn"}
    for name in ("reynet-synthetic-symmetry", "reynet-synthetic-trace", "reynet-mutag"):
        folder = ckpt / name
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.py"))  # no code in checkpoints
        card = (folder / "README.md").read_text()
        assert "{{" not in card and "## Usage" in card
        assert "custom_code" not in card and "model-index" not in card  # no code here; the data are not Hub datasets
    assert (out / "reynet_size_generalisation.png").is_file()


REFERENCE = sorted((REPO_ROOT / "checkpoints").glob("reynet-*"))


@pytest.mark.skipif(not REFERENCE, reason="no committed reference checkpoints")
@pytest.mark.parametrize("folder", REFERENCE, ids=lambda p: p.name)
def test_committed_checkpoints_load(folder):
    from transformers import AutoConfig

    import hf_koopman.models.reynet as reynet

    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 2 * 1024 * 1024, f"{folder.name} is {size} bytes"
    config = AutoConfig.from_pretrained(folder)
    cls = getattr(reynet, config.architectures[0])
    model = cls.from_pretrained(folder).eval()
    n = 6
    out = model(torch.rand(2, config.in_channels, n, n))
    assert torch.isfinite(out.logits).all()
