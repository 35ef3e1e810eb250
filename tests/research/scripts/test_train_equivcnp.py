"""`research.scripts.train_equivcnp --quick`: summary, tables, figures, cards, recard and grid-density stages."""

from __future__ import annotations

import json

from research.scripts import train_equivcnp


def test_training_script_quick_mode(tmp_path, data_dir):
    out, ckpt = tmp_path / "results", tmp_path / "ckpt"
    out.mkdir()
    # an earlier (non-quick) 1-D run in the summary must survive as a block of the GP table
    earlier = {"protocol": {"steps": 1000, "batch_size": 16, "learning_rate": 0.001, "quick": False},
               "models": {"EquivCNP": {"rbf": {"ll_mean": 0.5, "ll_std": 0.1, "cpu_seconds": 7.0}}}}
    (out / "equivcnp_summary.json").write_text(json.dumps({"gp_regression": earlier}))
    summary = train_equivcnp.main(["--quick", "--kernels", "rbf", "--groups", "RxSO2", "--data-dir", str(data_dir),
                                   "--output-dir", str(out), "--checkpoint-dir", str(ckpt)])
    on_disk = json.loads((out / "equivcnp_summary.json").read_text())
    assert on_disk["gp_regression"]["models"].keys() == {"EquivCNP", "ConvCNP", "CNP"}
    ll = on_disk["gp_regression"]["models"]["EquivCNP"]["rbf"]["ll_mean"]
    assert summary["gp_regression"]["models"]["EquivCNP"]["rbf"]["ll_mean"] == ll
    for f in ("equivcnp_gp_table.md", "equivcnp_gp_examples.png", "equivcnp_image_table.md", "equivcnp_image_completion.png"):
        assert (out / f).stat().st_size > 0, f
    card = (ckpt / "equivcnp-gp-rbf" / "README.md").read_text()
    assert f"{ll:.3f}" in card and "**group-equivariant conditional neural process**" in card
    # the baselines' cards describe the baselines (no group-equivariance claim, no LieConv tags)
    for name, claim in (("cnp-gp-rbf", "*not* translation-equivariant"), ("convcnp-gp-rbf", "*translation*-equivariant")):
        baseline = (ckpt / name / "README.md").read_text()
        assert claim in baseline and "group-equivariant conditional neural process**" not in baseline
        assert "lie-group" not in baseline and "finzi2020" not in baseline
    assert (ckpt / "equivcnp-image-rxso2" / "model.safetensors").is_file()
    table = (out / "equivcnp_gp_table.md").read_text()
    assert "## 1000 steps (earlier run" in table and "| EquivCNP (ours) | – | 0.500 ± 0.100 |" in table
    # a quick (CI) run is never kept as an earlier budget
    assert train_equivcnp._earlier_budgets(out / "equivcnp_summary.json", {"steps": 5, "quick": False}).keys() == {"1000 steps"}
    # recard re-renders the card from the summary; grid-density at the trained density reproduces the table's number
    common = ["--kernels", "rbf", "--groups", "RxSO2", "--output-dir", str(out), "--checkpoint-dir", str(ckpt)]
    (ckpt / "equivcnp-gp-rbf" / "README.md").unlink()
    train_equivcnp.main(["--experiments", "recard", *common])
    assert f"**{ll:.3f} ± " in (ckpt / "equivcnp-gp-rbf" / "README.md").read_text()
    gd = train_equivcnp.main(["--experiments", "grid-density", "--grid-densities", "8,16", "--grid-density-tasks", "4",
                              *common])["gp_grid_density"]["kernels"]["rbf"]
    assert gd["trained_points_per_unit"] == 8
    assert abs(gd["by_density"]["8.0"]["ll_mean"] - ll) < 1e-5  # same 4 tasks, same density
    assert gd["by_density"]["16.0"]["ll_mean"] != gd["by_density"]["8.0"]["ll_mean"]
