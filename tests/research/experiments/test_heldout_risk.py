"""The held-out-family study runner on a seconds-long grid: rows, features, labels, resumability, `datasets` loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from research.experiments.heldout_risk import (
    LR_LADDER,
    SHAPES,
    VARIANTS,
    ModelSpec,
    build_model,
    read_jsonl,
    run_study,
    shard_runs,
    smoke_grid,
    study_grid,
    task_data,
)


def test_full_grid_is_the_documented_design():
    runs = study_grid()
    assert len(runs) == len(VARIANTS) * len(SHAPES) * 2 * 2 * len(LR_LADDER) == 2704
    assert len({r.run_id for r in runs}) == len(runs)
    assert len(LR_LADDER) >= 8 and LR_LADDER[-1] / LR_LADDER[0] > 1000
    # any prefix covers every family: the first tier (seed 0, even rungs) holds all 13 variants and both tasks
    first = runs[: len(runs) // 4]
    assert {r.model.variant for r in first[:13 * 7]} == {ModelSpec(f, n, 2, 32, 0.02, "assoc_recall", 0).variant
                                                          for f, n in VARIANTS}
    assert {r.model.seed for r in first} == {0}
    assert {r.model.task for r in first} == {"assoc_recall", "wikitext2"}


def test_assoc_recall_as_causal_lm_labels_only_the_answer():
    data = task_data("assoc_recall", 0, num_train=8)
    ids, labels = data["input_ids"], data["labels"]
    assert ids.shape == labels.shape == (8, 64)
    assert (labels[:, :-1] == -100).all()
    assert torch.equal(labels[:, -1], ids[:, -1])
    # the answer is the value stored after the queried key (position 62)
    for row in ids:
        keys = row[0:8:2].tolist()
        assert row[62].item() in keys
        assert row[63].item() == row[2 * keys.index(row[62].item()) + 1].item()


@pytest.mark.parametrize("family,norm", VARIANTS)
def test_every_family_builds_with_the_requested_init_std(family, norm):
    model = build_model(ModelSpec(family, norm, 1, 16, 0.08, "assoc_recall", 0))
    ids = torch.randint(0, 256, (2, 64))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    stds = [p.std().item() for n, p in model.named_parameters() if p.ndim == 2 and "embed" in n.lower() or "wte" in n]
    assert stds and max(abs(s - 0.08) for s in stds) < 0.02, stds


@pytest.fixture
def few_power_iterations(monkeypatch):
    """Three Lanczos steps (Hessian-vector products) instead of the study's 20: the curvature features stay real
    numbers (what these tests read) and the smoke grid runs in a few seconds (the products were most of its time)."""
    import research.experiments.heldout_risk as study

    monkeypatch.setattr(study, "POWER_ITERATIONS", 3)


def test_smoke_run_rows_features_labels_and_resume(tmp_path, few_power_iterations):
    runs = smoke_grid()
    rows = run_study(runs, tmp_path, progress=False)
    assert len(rows) == len(runs) == 4
    table = read_jsonl(tmp_path / "runs.jsonl")
    assert [r["run_id"] for r in table] == [r.run_id for r in runs]
    assert len(read_jsonl(tmp_path / "features.jsonl")) == 2  # one per model init, reused across learning rates
    for row in table:
        # init features are present and finite, with their costs
        assert 0 < row["near_unit_mass_mean"] <= 1 or row["near_unit_mass_mean"] == 0
        assert row["hessian_top_eig"] is not None and row["adam_sharpness"] is not None
        assert row["adam_critical_lr"] == pytest.approx(38.0 / row["adam_sharpness"])
        for key in ("spectrum_seconds", "hessian_seconds", "adam_seconds", "train_seconds"):
            assert row[key] > 0
        # the label is consistent with the run: a divergent run stops at its divergence step
        if row["diverged"]:
            assert row["steps_run"] == row["divergence_step"] <= row["horizon"]
        else:
            assert row["steps_run"] == row["horizon"] and row["divergence_step"] is None
    # lr 10 on a no-norm model diverges (loss or gradient blows up); lr 1e-3 for 4 steps does not
    by = {(r["variant"], r["learning_rate"]): r for r in table}
    assert by[("rksp_gpt-none", 10.0)]["diverged"]
    assert not by[("rksp_gpt-none", 1e-3)]["diverged"]
    # rerunning adds nothing; a half-written last line is repaired and its run redone
    assert run_study(runs, tmp_path, progress=False) == []
    text = (tmp_path / "runs.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    (tmp_path / "runs.jsonl").write_text("".join(lines[:-1]) + lines[-1][:40])
    redone = run_study(runs, tmp_path, progress=False)
    assert [r["run_id"] for r in redone] == [runs[-1].run_id]
    assert len(read_jsonl(tmp_path / "runs.jsonl")) == 4


def test_shards_partition_the_grid_by_model_init_in_order():
    runs = study_grid()
    shards = [shard_runs(runs, i, 3) for i in range(3)]
    assert sorted(r.run_id for s in shards for r in s) == sorted(r.run_id for r in runs)
    for i, shard in enumerate(shards):
        assert [r.run_id for r in shard] == [r.run_id for r in runs if r in set(shard)]  # study order kept
        others = {r.model.model_id for j, s in enumerate(shards) if j != i for r in s}
        assert not others & {r.model.model_id for r in shard}  # an init's rungs (and features) stay in one shard
    with pytest.raises(ValueError, match="shard 3/3"):
        shard_runs(runs, 3, 3)


def test_rows_load_with_datasets(tmp_path, few_power_iterations):
    from datasets import load_dataset

    run_study(smoke_grid(), tmp_path, progress=False)
    ds = load_dataset("json", data_files=str(tmp_path / "runs.jsonl"), split="train")
    assert ds.num_rows == 4
    assert {"run_id", "diverged", "learning_rate", "near_unit_mass_mean", "hessian_top_eig"} <= set(ds.column_names)
    for line in (tmp_path / "runs.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN / Infinity literals
        assert "NaN" not in line and "Infinity" not in line


def test_merging_recomputed_curvature_replaces_only_its_columns(tmp_path):
    """`merge_curvature_refresh` writes the refreshed curvature values into features.jsonl and every run row of
    that init, lists a non-finite new value in `nonfinite` (dropping the replaced keys' old entries, keeping the
    others), leaves every other column as it was, and refuses while an init has no refreshed row."""
    import json

    from research.experiments.heldout_risk import (
        CURVATURE_KEYS, REFRESH_NAME, _append, _clean_row, merge_curvature_refresh, read_jsonl,
    )

    base = {k: 1.0 for k in CURVATURE_KEYS} | {"hessian_seconds": 1.0, "adam_seconds": 1.0, "curvature_error": ""}
    for name, rows in (("features.jsonl", [{"model_id": "a"}, {"model_id": "b"}]),
                       ("runs.jsonl", [{"model_id": "a", "run_id": "a1"}, {"model_id": "a", "run_id": "a2"},
                                       {"model_id": "b", "run_id": "b1"}])):
        for row in rows:
            _append(tmp_path / name, _clean_row(row | base | {"spec_x": float("nan"), "gd_critical_lr": float("inf")}))
    _append(tmp_path / REFRESH_NAME, _clean_row({"model_id": "a", **base, "hessian_top_eig": 5.0,
                                                 "gd_critical_lr": 0.4, "adam_critical_lr": float("inf"),
                                                 "curvature_code_commit": "abc"}))
    with pytest.raises(ValueError, match="1 inits have no refreshed curvature yet"):
        merge_curvature_refresh(tmp_path)
    _append(tmp_path / REFRESH_NAME, _clean_row({"model_id": "b", **base, "curvature_code_commit": "abc"}))
    assert merge_curvature_refresh(tmp_path) == 3
    runs = {r["run_id"]: r for r in read_jsonl(tmp_path / "runs.jsonl")}
    a1 = runs["a1"]
    assert a1["hessian_top_eig"] == 5.0 and a1["gd_critical_lr"] == 0.4 and a1["adam_critical_lr"] == float("inf")
    assert a1["curvature_code_commit"] == "abc" and math.isnan(a1["spec_x"])  # the other non-finite entry stays
    raw = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
    assert sorted(raw["nonfinite"].split(";")) == ["adam_critical_lr=inf", "spec_x=nan"]
    assert read_jsonl(tmp_path / "features.jsonl")[0]["hessian_top_eig"] == 5.0
