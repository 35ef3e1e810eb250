"""The committed ReyNet cards' Usage sections are what `research/scripts/train_reynet.py` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CARDS = sorted((REPO_ROOT / "checkpoints").glob("reynet-*"))


def _usage(folder: Path) -> str:
    text = (folder / "README.md").read_text(encoding="utf-8")
    return text.split("## Usage\n\n", 1)[1].split("\n\n## Training", 1)[0]


@pytest.mark.skipif(not CARDS, reason="no committed ReyNet checkpoints")
@pytest.mark.parametrize("folder", CARDS, ids=lambda p: p.name)
def test_card_usage_matches_the_training_script(folder):
    from research.scripts.train_reynet import _LABEL_NAMES, _usage_text

    config = json.loads((folder / "config.json").read_text())
    head, in_channels = config["architectures"][0], config["in_channels"]
    usage = _usage(folder)
    node_labels = _LABEL_NAMES.get(folder.name.removeprefix("reynet-").upper(), {}).get("node_labels")
    assert usage == _usage_text(head, f"hf-koopman/{folder.name}", in_channels, node_labels)
    assert "research.data" not in (folder / "README.md").read_text()  # research/ is not installed with the package
