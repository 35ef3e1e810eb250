"""research/scripts/rank_vs_exact.py: both recipes on the same snapshots, table written."""

from __future__ import annotations

import json

from research.scripts import rank_vs_exact as module


def test_rank_vs_exact_script_writes_both_recipes(tmp_path):
    model, config = module._build("minilm-l6", 1, 0)
    row = module.compare(model, "minilm", num_samples=256, seed=0, hidden=config.hidden_size)
    for label in ("rank32", "exact"):
        masses = [row[label][k] for k in ("near_unit_mass", "unstable_mass", "contractive_mass")]
        assert all(0.0 <= m <= 1.0 for m in masses) and sum(masses) <= 1.0 + 1e-9
        assert row[label]["spectral_radius_max"] > 0
    # the two recipes really differ (rank-32 compresses onto the dominant output directions)
    assert row["rank32"]["nonlinearity"] > row["exact"]["nonlinearity"]
    json.dumps(row)  # JSON-serialisable for results/rank_vs_exact.json
