"""The committed ReyNet cards: their Usage snippets load the head each checkpoint was saved with (also as Hub remote
code, without hf_koopman), build real graph inputs with the public helpers, and match what the training script writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_koopman.models.publishing import export_for_hub
from hf_koopman.testing_utils import run_without_hf_koopman

REPO_ROOT = Path(__file__).resolve().parents[3]
CARDS = sorted((REPO_ROOT / "checkpoints").glob("reynet-*"))


def _usage(folder: Path) -> tuple[str, list[str]]:
    """The card's Usage section and its ```python blocks."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    usage = text.split("## Usage\n\n", 1)[1].split("\n\n## Training", 1)[0]
    return usage, re.findall(r"```python\n(.*?)```", usage, re.DOTALL)


def _head(folder: Path) -> tuple[str, int]:
    config = json.loads((folder / "config.json").read_text())
    return config["architectures"][0], config["in_channels"]


@pytest.mark.slow
@pytest.mark.skipif(not CARDS, reason="no committed ReyNet checkpoints")
def test_first_usage_block_loads_the_saved_head_without_hf_koopman(tmp_path):
    # every card's first snippet, run against its Hub export in one process without hf_koopman
    code, heads = "", []
    for folder in CARDS:
        head, _ = _head(folder)
        hub = export_for_hub(folder, tmp_path / folder.name)
        code += _usage(folder)[1][0].replace(f"hf-koopman/{folder.name}", str(hub))
        code += "\nprint(type(model).__name__, tuple(model(x, node_mask=mask).logits.shape))\n"
        heads.append(head)
    proc = run_without_hf_koopman(code, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-len(heads):]
    assert all(line.startswith(head + " (2, ") for line, head in zip(lines, heads)), proc.stdout
    assert "classifier" not in proc.stderr and "regressor" not in proc.stderr  # no report of unused head weights


def test_graph_card_builds_real_graph_inputs(monkeypatch, tmp_path):
    folder = REPO_ROOT / "checkpoints" / "reynet-mutag"
    if not folder.is_dir():
        pytest.skip("no committed MUTAG checkpoint")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    blocks = _usage(folder)[1]
    assert len(blocks) == 2 and "build_graph_tensor" in blocks[1] and "ReyNetGraphCollator" in blocks[1]
    namespace: dict = {}
    exec("\n".join(blocks).replace("hf-koopman/reynet-mutag", str(folder)), namespace)  # registered classes: no code
    assert type(namespace["model"]).__name__ == "ReyNetForGraphClassification"
    assert namespace["batch"]["graph_tensor"].shape == (2, 8, 5, 5)
    assert namespace["logits"].shape == (2, 2)


def test_mutag_checkpoint_names_its_classes_and_atom_types():
    folder = REPO_ROOT / "checkpoints" / "reynet-mutag"
    if not folder.is_dir():
        pytest.skip("no committed MUTAG checkpoint")
    import hf_koopman  # noqa: F401 - registers the classes
    from transformers import AutoConfig

    # TU MUTAG: graph labels -1 / 1 (125 mutagenic compounds) read as 0 / 1; node labels 0..6 are atom types
    assert AutoConfig.from_pretrained(folder).id2label == {0: "non-mutagenic", 1: "mutagenic"}
    assert "(0 C, 1 N, 2 O, 3 F, 4 I, 5 Cl, 6 Br)" in _usage(folder)[0]
