"""research/scripts/weights_origin_scan.py on a few model types: the table counts what `weights_origin` read."""

from __future__ import annotations

import json

from research.scripts import weights_origin_scan


def test_scan_counts_reads_and_names_misreads(tmp_path):
    weights_origin_scan.main(["--out", str(tmp_path), "--types", "gpt2,efficientnet,no_such_type"])
    rows = {row["model_type"]: row for row in json.loads((tmp_path / "weights_origin.json").read_text())}
    assert rows["gpt2"]["origin"] == "init" and rows["gpt2"]["norm_vectors"] > 0
    assert rows["efficientnet"]["origin"] == "unknown (no norm scale)"  # batch norms only: not read
    assert rows["no_such_type"]["origin"] == "not buildable"
    table = (tmp_path / "weights_origin.md").read_text()
    assert "**Misread as pretrained: 0 of 2** model types that build." in table
    fake = weights_origin_scan.render([{"model_type": "x", "origin": "pretrained"}, {"model_type": "y", "origin": "init"}])
    assert "**Misread as pretrained: 1 of 2** model types that build (x)." in fake
