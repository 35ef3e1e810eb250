"""The EquivCNP checkpoint cards' equivariance numbers are what `research/scripts/train_equivcnp.py` measures."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_image_card_reports_the_measured_equivariance_error():
    """The SO(2) card's numbers are what the generator's own check measures on the shipped weights (no retraining)."""
    import re

    from transformers import AutoModel

    from research.scripts.train_equivcnp import card_equivariance_error

    folder = REPO / "checkpoints" / "equivcnp-image-so2"
    card = (folder / "README.md").read_text()
    size = int(re.search(r"size = (\d+)", card).group(1))
    model = AutoModel.from_pretrained(folder).eval()
    shipped, _, what = card_equivariance_error(model, "image", size)
    raised, _, _ = card_equivariance_error(model, "image", size, num_neighbours=64)
    assert f"{what} changes the predictive mean by at most {shipped:.1e} with the shipped `num_neighbours=16`" in card
    assert f"by {raised:.1e} with `num_neighbours=64`" in card
    assert shipped > 1e-3 > 1e-4 > raised  # the truncated window is what breaks exactness here
