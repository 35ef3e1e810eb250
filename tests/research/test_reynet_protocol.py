"""The graph-classification protocol of `research/scripts/train_reynet.py`: lock-step CV, deadline stop, best common epoch,
and the channel-last IEGN path the models use (same maps as the 15-op basis)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hf_koopman.models.reynet import IEGNLinear



from research.experiments import reynet as rx  # noqa: E402


def _random_gin(tmp_path: Path, num_graphs: int = 16, seed: int = 0) -> Path:
    """A toy TU dataset in GIN format: class 1 graphs are denser, so the task is learnable."""
    gen = torch.Generator().manual_seed(seed)
    lines = [str(num_graphs)]
    for g in range(num_graphs):
        label = g % 2
        n = int(torch.randint(3, 7, (1,), generator=gen))
        A = torch.rand(n, n, generator=gen) < (0.7 if label else 0.25)
        A = torch.triu(A, 1)
        A = A | A.T
        lines.append(f"{n} {label}")
        for v in range(n):
            nbrs = torch.nonzero(A[v]).flatten().tolist()
            lines.append(" ".join(map(str, [int(torch.randint(0, 2, (1,), generator=gen)), len(nbrs), *nbrs])))
    folder = tmp_path / "graphs" / "TOY"
    folder.mkdir(parents=True)
    (folder / "TOY.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def _tiny_protocol(epochs: int) -> rx.GraphProtocol:
    return rx.GraphProtocol(
        num_folds=2, epochs={"TOY": epochs}, lr_step_epochs={"TOY": 2}, batch_size=4, seed=3,
        reynet={"phi_mode": "joint", "phi_hidden_sizes": [4], "reynolds_channels": 4, "channel_hidden_sizes": [4],
                "head_hidden_sizes": [4]},
        iegn={"channel_hidden_sizes": [4], "head_hidden_sizes": [4]},
    )


def test_best_common_epoch_is_max_of_fold_mean():
    # fold means per epoch: 0.5, 0.75, 0.7 -> epoch 2, although fold 0 alone peaks at epoch 3
    per_epoch = [[0.5, 0.7, 0.9], [0.5, 0.8, 0.5]]
    epoch, mean, std = rx.best_common_epoch(per_epoch)
    assert epoch == 2 and mean == pytest.approx(0.75) and std == pytest.approx(0.05)
    with pytest.raises(ValueError, match="non-empty"):
        rx.best_common_epoch([])


def test_lockstep_cv_equals_training_each_fold_alone(tmp_path):
    """Interleaving folds and models epoch by epoch changes nothing: fold k of the lock-step run is the model that
    training fold k on its own (same seeds, same StepLR) produces; both kinds get the same number of epochs."""
    data = _random_gin(tmp_path)
    protocol = _tiny_protocol(epochs=3)
    res = rx.run_graph_cv(data, "TOY", protocol)
    assert res["epochs"] == 3 and not res["stopped_at_deadline"]
    for kind in ("reynet", "iegn"):
        entry = res["models"][kind]
        assert [len(r) for r in entry["per_epoch_accuracy"]] == [3, 3]
        assert entry["fold_accuracies"] == [r[-1] for r in entry["per_epoch_accuracy"]]
        assert entry["best_common_epoch"]["epoch"] in (1, 2, 3)

    graphs, num_classes, num_labels = rx.load_gin_graphs(data, "TOY")
    ds = rx.GraphDataset(graphs, num_labels)
    train_idx, test_idx = rx.stratified_kfold(ds.labels, 2, protocol.seed)[1]
    torch.manual_seed(protocol.seed + 1)
    model = rx.graph_model("iegn", num_labels + 1, num_classes, protocol)
    losses = rx.train_graph_classifier(model, ds, train_idx, epochs=3, lr=protocol.lr, batch_size=protocol.batch_size,
                                       seed=protocol.seed + 1, desc="alone", lr_step_epochs=2, lr_gamma=0.5)
    assert losses == pytest.approx(res["models"]["iegn"]["train_loss"][1], rel=1e-6)
    assert rx._accuracy(model, ds, test_idx, 4) == res["models"]["iegn"]["per_epoch_accuracy"][1][-1]


def test_deadline_stops_every_fold_at_the_same_epoch(tmp_path):
    data = _random_gin(tmp_path)
    saved = []
    res = rx.run_graph_cv(data, "TOY", _tiny_protocol(epochs=5), on_epoch=lambda r: saved.append(r["epochs"]),
                          deadline=time.time())  # already passed: only the first epoch runs
    assert res["epochs"] == 1 and res["stopped_at_deadline"] and saved == [1]
    for entry in res["models"].values():
        assert [len(r) for r in entry["per_epoch_accuracy"]] == [1, 1]


@pytest.mark.parametrize("masked", [False, True])
def test_iegn_channels_last_matches_basis(masked):
    """The channel-last GEMM path the model blocks use equals the materialised 15-op basis (with node masks)."""
    torch.manual_seed(0)
    layer = IEGNLinear(3, 5, factorized=False).double()
    with torch.no_grad():
        layer.bias_all.normal_()
        layer.bias_diag.normal_()
    X = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    if masked:
        mask[1, 4:] = False
        mask[2, 5:] = False
    both = mask[:, None, :, None] & mask[:, None, None, :]
    reference = layer(X, mask if masked else None)
    h = X.masked_fill(~both, 0.0).permute(0, 2, 3, 1)  # the caller's contract: zero padding
    out = layer.forward_channels_last(h, mask.sum(1) if masked else None).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.masked_fill(~both, 0.0), reference, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# readout selection on a validation split of the training fold
# ----------------------------------------------------------------------------------------------------------------------
def test_validation_split_is_a_seeded_stratified_part_of_the_training_fold():
    labels = [0] * 30 + [1] * 10 + [2] * 3
    train_idx = list(range(0, 43, 1))[5:]  # indices 0..4 are the "test fold"
    inner, val = rx.validation_split(train_idx, labels, 0.1, seed=7)
    assert sorted(inner + val) == sorted(train_idx) and not set(inner) & set(val)
    counts = {c: sum(labels[i] == c for i in val) for c in (0, 1, 2)}
    assert counts == {0: 2, 1: 1, 2: 1}  # round(0.1 * 25) = 2, round(0.1 * 10) = 1, at least one of the 3
    assert rx.validation_split(train_idx, labels, 0.1, seed=7) == (inner, val)  # deterministic
    assert rx.validation_split(train_idx, labels, 0.1, seed=8)[1] != val  # and seeded
    with pytest.raises(ValueError, match="fraction"):
        rx.validation_split(train_idx, labels, 1.0, seed=0)


class _RecordingDataset:
    """Wraps a GraphDataset and records every graph index that is read."""

    def __init__(self, ds):
        self.ds, self.read = ds, set()
        self.tensors, self.labels, self.sizes = ds.tensors, ds.labels, ds.sizes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.read.add(i)
        return self.ds[i]


def test_readout_selection_never_reads_the_test_fold_and_is_deterministic(tmp_path):
    data = _random_gin(tmp_path, num_graphs=20)
    protocol = _tiny_protocol(epochs=2)
    graphs, num_classes, num_labels = rx.load_gin_graphs(data, "TOY")
    ds = rx.GraphDataset(graphs, num_labels)
    folds = rx.stratified_kfold(ds.labels, 2, protocol.seed)
    runs = []
    for _ in range(2):
        rec = _RecordingDataset(ds)
        sel = rx.select_readouts(rec, [folds[0][0]], protocol, "TOY", num_classes, ("sum", "mean"))
        assert rec.read and rec.read <= set(folds[0][0]) and not rec.read & set(folds[0][1])
        runs.append(sel)
    assert runs[0] == {**runs[1], "models": {k: {**v, "cpu_seconds": runs[0]["models"][k]["cpu_seconds"]}
                                             for k, v in runs[1]["models"].items()}}
    for kind, entry in runs[0]["models"].items():
        assert entry["chosen"][0] in ("sum", "mean")
        assert [len(entry["val_accuracy"][r][0]) for r in ("sum", "mean")] == [2, 2]
        best = max(entry["val_accuracy"][r][0][-1] for r in ("sum", "mean"))
        assert entry["val_accuracy"][entry["chosen"][0]][0][-1] == best


def test_cv_with_readout_selection_trains_the_chosen_readout(tmp_path, monkeypatch):
    data = _random_gin(tmp_path, num_graphs=20)
    protocol = _tiny_protocol(epochs=2)
    built = []
    real = rx.graph_model

    def spy(kind, in_channels, num_classes, protocol, pooling=None):
        built.append((kind, pooling))
        return real(kind, in_channels, num_classes, protocol, pooling=pooling)

    monkeypatch.setattr(rx, "graph_model", spy)
    res = rx.run_graph_cv(data, "TOY", protocol, readouts=("sum", "mean"), selection_epochs=1)
    sel = res["readout_selection"]
    assert sel["epochs"] == 1 and sel["val_sizes"] == [1 + 1, 1 + 1]  # one graph per class and fold
    final = built[-4:]  # the final models, built after the 2 folds x 2 kinds x 2 candidates of the selection
    assert len(built) == 8 + 4
    assert final == [(kind, sel["models"][kind]["chosen"][k]) for k in range(2) for kind in ("reynet", "iegn")]
    for kind in ("reynet", "iegn"):
        assert res["models"][kind]["readouts"] == sel["models"][kind]["chosen"]
        assert [len(r) for r in res["models"][kind]["per_epoch_accuracy"]] == [2, 2]


def _fake_graph_file(folder: Path, name: str, reynet: list[float], iegn: list[float], *, epochs: int = 4,
                     max_epochs: int | None = None, pooling: str = "mean") -> None:
    """A complete `reynet_graphs_<name>.json` as `train_reynet.py graphs` writes it (the fields the summary reads)."""
    import json

    def model(acc):
        mean = sum(acc) / len(acc)
        return {"fold_accuracies": acc, "mean": mean, "std": 0.0, "train_loss": [[0.5] * epochs for _ in acc],
                "per_epoch_accuracy": [[a] * epochs for a in acc], "best_common_epoch": {"epoch": epochs, "mean": mean, "std": 0.0}}

    d = {"epochs": epochs, "max_epochs": max_epochs or epochs, "eval_folds": len(reynet), "num_folds": len(reynet),
         "models": {"reynet": model(reynet), "iegn": model(iegn)}}
    protocol = {"max_epochs": {name: epochs}, "schedule": {name: f"{epochs} epochs"}, "deadline_utc": None,
                "reynet": {"num_reynolds_layers": 3, "pooling": pooling}, "iegn": {"pooling": pooling}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"reynet_graphs_{name}.json").write_text(json.dumps({"protocol": protocol, "datasets": {name: d}}))


def _fake_run(folder: Path, seed: int, reynet: list[float], iegn: list[float], epochs: int = 3, max_epochs: int = 3):
    """One repetition of the repeated CV: `folder/seed<seed>/reynet_graphs_TOY.json`."""
    _fake_graph_file(folder / f"seed{seed}", "TOY", reynet, iegn, epochs=epochs, max_epochs=max_epochs)


def test_repeated_cv_aggregates_per_seed_paired_differences(tmp_path):
    from research.scripts import train_reynet

    folder = tmp_path / "reynet_repeated_cv"
    _fake_run(folder, 10, [0.8, 0.6], [0.7, 0.7])  # difference +0.0, ReyNet >= IEGN on 1 of 2 folds
    _fake_run(folder, 2, [0.9, 0.9], [0.5, 0.7])  # +0.3, 2 of 2 (seed 2 sorts before seed 10 numerically)
    rep = train_reynet.repeated_cv(folder)["TOY"]
    assert rep["seeds"] == [2, 10]
    assert rep["difference"] == pytest.approx([0.3, 0.0])
    assert rep["mean_difference"] == pytest.approx(0.15)
    assert rep["sem_difference"] == pytest.approx(0.15)  # std of (0.3, 0) is 0.2121, / sqrt(2)
    assert rep["reynet_mean"] == pytest.approx(0.8) and rep["iegn_mean"] == pytest.approx(0.65)
    assert (rep["folds_reynet_ge"], rep["folds"]) == (3, 4)
    md = "\n".join(train_reynet.repeated_cv_markdown({"TOY": rep}, "results"))
    assert "| mean | 80.0 | 65.0 | +15.0 ± 15.0 |" in md and "**yes**" in md
    assert train_reynet.repeated_cv(tmp_path / "absent") == {}


def test_verdict_checks_the_last_epochs_against_one_noisy_epoch():
    """The paired difference over each fold's last epochs can differ from the last epoch's: both are reported."""
    from research.scripts import train_reynet

    def model(rows):
        return {"per_epoch_accuracy": rows, "fold_accuracies": [r[-1] for r in rows],
                "mean": sum(r[-1] for r in rows) / len(rows),
                "best_common_epoch": {"epoch": len(rows[0]), "mean": 0.0, "std": 0.0}}

    # ReyNet steady at 0.70; IEGN at 0.66 for six epochs, then a spike to 0.72 in the last one
    d = {"models": {"reynet": model([[0.70] * 7, [0.70] * 7]),
                    "iegn": model([[0.66] * 6 + [0.72], [0.66] * 6 + [0.74]])}}
    last = train_reynet._paired(d)
    assert last["mean"] == pytest.approx(-0.03) and last["folds_reynet_ge"] == 0
    tail = train_reynet._paired(d, train_reynet.TAIL_EPOCHS)  # IEGN's last five: (4·0.66 + 0.72)/5 = 0.672, 0.676
    assert tail["mean"] == pytest.approx(0.026) and tail["folds_reynet_ge"] == 2
    short = {"models": {k: model([row[:2] for row in m["per_epoch_accuracy"]]) for k, m in d["models"].items()}}
    assert train_reynet._paired(short, 5)["mean"] == pytest.approx(0.04)  # a 2-epoch run averages what it has
    text = train_reynet._verdict({"datasets": {"TOY": d}})
    assert "no at the last epoch" in text and "TOY -3.0 ± 1.0 (ReyNet ≥ IEGN on 0/2 folds)" in text
    assert "last 5 epochs" in text and "TOY +2.6 ± 0.2 (ReyNet ≥ IEGN on 2/2 folds)" in text


def test_repeated_cv_rejects_an_incomplete_run(tmp_path):
    from research.scripts import train_reynet

    _fake_run(tmp_path, 1, [0.8], [0.7], epochs=2, max_epochs=3)
    with pytest.raises(ValueError, match="incomplete run"):
        train_reynet.repeated_cv(tmp_path)


def test_supplementary_run_section_compares_with_the_main_row(tmp_path):
    from research.scripts import train_reynet

    main_dir, sup = tmp_path / "results", tmp_path / "results" / "reynet_supplementary_toy"
    _fake_graph_file(main_dir, "TOY", [0.6, 0.6], [0.7, 0.7], epochs=2, pooling="sum")
    _fake_graph_file(sup, "TOY", [0.8, 0.7], [0.7, 0.6])
    with pytest.raises(ValueError, match="PURPOSE.md"):
        train_reynet.supplementary_markdown(sup, None)
    (sup / "PURPOSE.md").write_text("Decided before the run.\n")
    main = train_reynet._load_graph_results(main_dir)
    md = "\n".join(train_reynet.supplementary_markdown(sup, main))
    assert "### Supplementary run `reynet_supplementary_toy`" in md and "Decided before the run." in md
    assert "| TOY | mean (fixed) | 2/2 | 4 | 75.0 ± 0.0 | 65.0 ± 0.0 |" in md
    assert "TOY +10.0 ± 0.0 (ReyNet ≥ IEGN on 2/2 folds)" in md
    # same folds as the main row (sum readout, 2 epochs): ReyNet 60 -> 75, IEGN 70 -> 65
    assert "ReyNet +15.0 points (60.0 → 75.0 %); IEGN -5.0 points (70.0 → 65.0 %)" in md
    assert "2 epochs, sum (fixed)" in md
    assert "Models: ReyNet `num_reynolds_layers=3, pooling=mean`; IEGN `pooling=mean`." in md
    assert "Outcome" not in md
    assert (sup / "curves.png").stat().st_size > 0 and "(reynet_supplementary_toy/curves.png)" in md
    assert "trained on" not in md and "cut back" not in md
    (sup / "OUTCOME.md").write_text("Read after the run.\n")
    md = "\n".join(train_reynet.supplementary_markdown(sup, main))
    assert "**Outcome (written after the run).** Read after the run." in md
    # a fold-subset run is compared with the main row on its own folds
    import json

    f = sup / "reynet_graphs_TOY.json"
    run = json.loads(f.read_text())
    run["datasets"]["TOY"]["fold_ids"] = [1]
    f.write_text(json.dumps(run))
    main_row = main["datasets"]["TOY"]["models"]
    main_row["reynet"]["fold_accuracies"] = [0.5, 0.6]  # fold 1 only: 60 %, not the 55 % mean of both
    main_row["reynet"]["per_epoch_accuracy"] = [[0.5, 0.5], [0.6, 0.6]]
    md = "\n".join(train_reynet.supplementary_markdown(sup, main))
    assert "on the run's folds [1]: ReyNet +15.0 points (60.0 → 75.0 %)" in md
    run["datasets"]["TOY"].pop("fold_ids")
    f.write_text(json.dumps(run))
    # a GPU run whose fold processes were cut back to a common epoch says so
    run["protocol"].update(device="cuda", deadline_utc="+495")
    run["datasets"]["TOY"]["truncated_from_epochs"] = [5, 4]
    f.write_text(json.dumps(run))
    md = "\n".join(train_reynet.supplementary_markdown(sup, main))
    assert ("wall-clock budget of 495 s per process; trained on cuda (initialised on the CPU with the CPU runs' "
            "seeds); TOY: fold processes stopped after [4, 5] epochs, all cut back to 4.") in md


def test_reynolds_layers_option_stacks_blocks_in_the_graph_run(tmp_path):
    import json

    from research.scripts import train_reynet

    data = _random_gin(tmp_path)
    runs = {}
    for layers in (1, 2):
        out = tmp_path / f"out{layers}"
        train_reynet.main(["graphs", "--datasets", "TOY", "--graph-epochs", "TOY=1", "--num-folds", "2",
                           "--reynolds-layers", str(layers), "--data-dir", str(data), "--output-dir", str(out)])
        runs[layers] = json.loads((out / "reynet_graphs_TOY.json").read_text())
    assert [runs[k]["protocol"]["reynet"]["num_reynolds_layers"] for k in (1, 2)] == [1, 2]
    n1, n2 = (runs[k]["datasets"]["TOY"]["models"]["reynet"]["num_parameters"] for k in (1, 2))
    assert n2 > n1  # a second Reynolds block really is trained
    # IEGN is untouched by the option
    assert (runs[1]["datasets"]["TOY"]["models"]["iegn"]["num_parameters"]
            == runs[2]["datasets"]["TOY"]["models"]["iegn"]["num_parameters"])
    with pytest.raises(ValueError, match="--reynolds-layers must be >= 1"):
        train_reynet.main(["graphs", "--datasets", "TOY", "--graph-epochs", "TOY=1", "--reynolds-layers",
                           "0", "--data-dir", str(data), "--output-dir", str(tmp_path / "bad")])


def test_lr_pilot_reads_only_training_folds_and_renders_a_table(tmp_path, monkeypatch):
    from research.scripts import reynet_lr_pilot

    data = _random_gin(tmp_path)
    seen: list[list[int]] = []
    real = rx.select_readouts

    def spy(ds, train_folds, protocol, *args, **kwargs):
        seen.extend(list(tr) for tr in train_folds)
        assert protocol.lr == 0.01
        return real(ds, train_folds, protocol, *args, **kwargs)

    monkeypatch.setattr(rx, "select_readouts", spy)
    res = reynet_lr_pilot.run_pilot(data, "TOY", 0.01, folds=2, epochs=2)
    from research.data.graphs import GraphDataset, load_gin_graphs, stratified_kfold

    graphs, _, labels = load_gin_graphs(data, "TOY")
    outer = stratified_kfold(GraphDataset(graphs, labels).labels, 10, 1234)
    assert seen == [list(outer[0][0]), list(outer[1][0])]  # the training parts of folds 0 and 1, nothing else
    assert res["lr"] == 0.01 and res["epochs"] == 2
    assert [len(row) for row in res["models"]["reynet"]["val_accuracy"]] == [2, 2]
    md = reynet_lr_pilot.pilot_table([res])
    assert md.count("| TOY | 0.01 |") == 2
    with pytest.raises(ValueError, match="learning rate must be positive"):
        reynet_lr_pilot.run_pilot(data, "TOY", 0.0, epochs=1)
    wide = reynet_lr_pilot.run_pilot(data, "TOY", 0.01, folds=1, epochs=1, variant="wide")
    assert wide["reynet"]["channel_hidden_sizes"] == rx.REYNET_WIDE["channel_hidden_sizes"]
    assert wide["num_parameters"]["reynet"] > 2 * res["num_parameters"]["reynet"]
    assert wide["num_parameters"]["iegn"] == res["num_parameters"]["iegn"]
    assert "| TOY | 0.01 | ReyNet (wide) |" in reynet_lr_pilot.pilot_table([res, wide])
    with pytest.raises(ValueError, match="variant must be one of"):
        reynet_lr_pilot.run_pilot(data, "TOY", 0.01, epochs=1, variant="deep")


def test_fold_subset_runs_merge_into_the_all_folds_run(tmp_path):
    """`fold_ids` runs (seeds follow the fold index) joined by `merge_fold_runs` equal one run of all folds."""
    data = _random_gin(tmp_path, num_graphs=18)
    protocol = _tiny_protocol(epochs=2)
    protocol.num_folds = 3
    whole = rx.run_graph_cv(data, "TOY", protocol)
    parts = []
    for ids in ([2], [0, 1]):  # out of order on purpose
        protocol.fold_ids = ids
        parts.append(rx.run_graph_cv(data, "TOY", protocol))
    merged = rx.merge_fold_runs(parts)
    assert merged["fold_ids"] == [0, 1, 2] and merged["eval_folds"] == 3
    assert merged["fold_sizes"] == whole["fold_sizes"]
    for kind in ("reynet", "iegn"):
        m, w = merged["models"][kind], whole["models"][kind]
        assert m["per_epoch_accuracy"] == w["per_epoch_accuracy"]
        assert m["train_loss"] == w["train_loss"]  # bit-identical: same seeds, same ops
        assert (m["mean"], m["std"], m["best_common_epoch"]) == (w["mean"], w["std"], w["best_common_epoch"])
    with pytest.raises(ValueError, match="overlap"):
        rx.merge_fold_runs([parts[1], parts[1]])
    short = {**parts[0], "epochs": 1}
    with pytest.raises(ValueError, match="disagree on \\['epochs'\\]"):
        rx.merge_fold_runs([short, parts[1]])
    with pytest.raises(ValueError, match="at least two"):
        rx.merge_fold_runs(parts[:1])
    for bad in ([3], [0, 0], []):
        protocol.fold_ids = bad
        with pytest.raises(ValueError, match="fold_ids must be distinct fold indices"):
            rx.run_graph_cv(data, "TOY", protocol)


def test_design_order_and_folds_options_and_merge_stage(tmp_path):
    import json

    from research.scripts import train_reynet

    data = _random_gin(tmp_path)
    common = ["--datasets", "TOY", "--graph-epochs", "TOY=1", "--num-folds", "2", "--data-dir", str(data)]
    outs = {}
    for name, extra in {"a": ["--folds", "0"], "b": ["--folds", "1"], "all": []}.items():
        outs[name] = tmp_path / name
        train_reynet.main(["graphs", *common, "--design-order", "3", *extra, "--output-dir", str(outs[name])])
    run = json.loads((outs["a"] / "reynet_graphs_TOY.json").read_text())
    assert run["protocol"]["reynet"]["design_order"] == 3 and run["datasets"]["TOY"]["fold_ids"] == [0]
    pair = tmp_path / "pairs"
    train_reynet.main(["graphs", *common, "--output-dir", str(pair)])
    n3 = run["datasets"]["TOY"]["models"]["reynet"]["num_parameters"]
    n2 = json.loads((pair / "reynet_graphs_TOY.json").read_text())["datasets"]["TOY"]["models"]["reynet"]
    assert n3 > n2["num_parameters"]  # φ's first layer reads 9C entries instead of 4C
    merged_dir = tmp_path / "merged"
    b_file = outs["b"] / "reynet_graphs_TOY.json"  # as if fold 1 had run later, under its own deadline
    b_run = json.loads(b_file.read_text())
    b_run["protocol"]["deadline_utc"] = "23:59"
    b_file.write_text(json.dumps(b_run))
    train_reynet.main(["merge-folds", "--inputs", f"{outs['a']},{outs['b']}", "--output-dir", str(merged_dir)])
    merged_run = json.loads((merged_dir / "reynet_graphs_TOY.json").read_text())
    assert merged_run["protocol"]["deadline_utc"] == [None, "23:59"]  # each subset's deadline is kept
    merged = merged_run["datasets"]["TOY"]
    whole = json.loads((outs["all"] / "reynet_graphs_TOY.json").read_text())["datasets"]["TOY"]
    for kind in ("reynet", "iegn"):
        assert merged["models"][kind]["per_epoch_accuracy"] == whole["models"][kind]["per_epoch_accuracy"]
    with pytest.raises(ValueError, match="different protocols"):
        train_reynet.main(["merge-folds", "--inputs", f"{outs['a']},{pair}", "--output-dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="needs --inputs"):
        train_reynet.main(["merge-folds", "--output-dir", str(tmp_path / "y")])


def test_fit_check_trains_on_fold0_training_graphs_only_and_renders_a_table(tmp_path):
    from research.scripts import reynet_fit_check as fc

    data = _random_gin(tmp_path, num_graphs=40)
    graphs, _, num_labels = rx.load_gin_graphs(data, "TOY")
    ds = rx.GraphDataset(graphs, num_labels)
    train0, test0 = rx.stratified_kfold(ds.labels, 10, 1234)[0]
    subset = fc.training_subset(ds.labels, 20, 1234)
    assert len(subset) == 20 and set(subset) <= set(train0) and not set(subset) & set(test0)
    assert subset == fc.training_subset(ds.labels, 20, 1234)  # seeded
    with pytest.raises(ValueError, match="graphs must be in"):
        fc.training_subset(ds.labels, len(train0) + 1, 1234)
    res = fc.run_fit_check(data, "TOY", num_graphs=12, epochs=3, kinds=["reynet", "reynet3", "reynet_wide", "iegn"])
    assert set(res["models"]) == {"reynet", "reynet3", "reynet_wide", "iegn"} and res["graphs"] == 12
    for m in res["models"].values():
        assert len(m["train_loss"]) == 3 and 0.0 <= m["final_accuracy"] <= 1.0 and m["final_loss"] > 0
    assert res["models"]["reynet3"]["num_parameters"] > res["models"]["reynet"]["num_parameters"]
    assert res["models"]["reynet_wide"]["num_parameters"] > 2 * res["models"]["reynet"]["num_parameters"]
    table = fc.fit_table([res])
    assert "ReyNet (triples)" in table and "CE ep. 3" in table and "first epoch CE < 0.1" in table
    first = {**res, "models": {"reynet": res["models"]["reynet"]}}
    second = {**res, "models": {"iegn": res["models"]["iegn"]}}
    merged = fc.fit_table([first, second])  # two processes of one setting -> one table
    assert merged.count("| model |") == 1 and "| ReyNet (pairs) |" in merged and "| IEGN |" in merged
    with pytest.raises(ValueError, match="kinds must be"):
        fc.run_fit_check(data, "TOY", num_graphs=12, epochs=1, kinds=["gin"])


def test_truncated_fold_parts_equal_a_run_planned_for_fewer_epochs(tmp_path):
    """Fold processes stopped an epoch apart by one deadline are cut back to the common count: the result is the
    run planned for that many epochs (the step schedule does not depend on the total)."""
    data = _random_gin(tmp_path, num_graphs=18)
    protocol = _tiny_protocol(epochs=1)
    protocol.num_folds = 3
    short = rx.run_graph_cv(data, "TOY", protocol)
    protocol.epochs = {"TOY": 3}
    protocol.fold_ids = [0, 1]
    long = rx.run_graph_cv(data, "TOY", protocol)
    protocol.fold_ids = [2]
    rest = rx.run_graph_cv(data, "TOY", protocol, deadline=time.time())  # the deadline stops it after epoch 1
    assert rest["epochs"] == 1
    with pytest.raises(ValueError, match="disagree on \\['epochs'\\]"):
        rx.merge_fold_runs([long, rest])
    cut = rx.truncate_fold_run(long, 1)
    assert cut["epochs"] == 1 and cut["truncated_from_epochs"] == 3 and long["epochs"] == 3  # the input is untouched
    merged = rx.merge_fold_runs([cut, rest])
    assert merged["truncated_from_epochs"] == [3, 3, 1]
    for kind in ("reynet", "iegn"):
        m, w = merged["models"][kind], short["models"][kind]
        assert m["per_epoch_accuracy"] == w["per_epoch_accuracy"] and m["train_loss"] == w["train_loss"]
        assert (m["mean"], m["best_common_epoch"]) == (w["mean"], w["best_common_epoch"])
        assert cut["models"][kind]["time_scaled"]
        assert cut["models"][kind]["cpu_seconds"] == pytest.approx(long["models"][kind]["cpu_seconds"] / 3)
        assert w["wall_seconds"] > 0 and w["cpu_seconds"] > 0
    assert rx.truncate_fold_run(long, 3) == long
    for bad in (0, 4):
        with pytest.raises(ValueError, match="can cut TOY back to 1..3 epochs"):
            rx.truncate_fold_run(long, bad)


def test_schedule_device_and_relative_deadline_options(tmp_path, monkeypatch):
    import json

    from research.scripts import train_reynet

    data = _random_gin(tmp_path)
    common = ["--datasets", "TOY", "--graph-epochs", "TOY=2", "--lr-step-epochs", "TOY=1", "--num-folds", "2",
              "--data-dir", str(data)]
    outs = {}
    for name, budget in {"a": "+0.001", "b": "+3600"}.items():  # 'a' stops after its first epoch
        outs[name] = tmp_path / name
        train_reynet.main(["graphs", *common, "--lr", "1e-4", "--lr-gamma", "0.7", "--device", "cpu",
                           "--deadline", budget, "--folds", "0" if name == "a" else "1", "--output-dir", str(outs[name])])
    run = json.loads((outs["b"] / "reynet_graphs_TOY.json").read_text())
    stopped = json.loads((outs["a"] / "reynet_graphs_TOY.json").read_text())["datasets"]["TOY"]
    assert stopped["stopped_at_deadline"] and stopped["epochs"] == 1 and not run["datasets"]["TOY"]["stopped_at_deadline"]
    assert run["protocol"]["device"] == "cpu" and run["protocol"]["deadline_utc"] == "+3600"
    assert run["protocol"]["schedule"]["TOY"].startswith("Adam lr 0.0001, ×0.7 every 1 epochs")
    assert run["datasets"]["TOY"]["epochs"] == 2 and run["datasets"]["TOY"]["device"] == "cpu"
    inputs = ["--inputs", f"{outs['a']},{outs['b']}", "--output-dir", str(tmp_path / "m")]
    with pytest.raises(ValueError, match="disagree on \\['epochs'\\]"):
        train_reynet.main(["merge-folds", *inputs])
    train_reynet.main(["merge-folds", *inputs, "--common-epochs"])
    merged = json.loads((tmp_path / "m" / "reynet_graphs_TOY.json").read_text())["datasets"]["TOY"]
    assert merged["epochs"] == 1 and merged["truncated_from_epochs"] == [1, 2]
    assert merged["models"]["iegn"]["per_epoch_accuracy"][1] == run["datasets"]["TOY"]["models"]["iegn"][
        "per_epoch_accuracy"][0][:1]
    for bad, msg in ((["--lr", "0"], "--lr must be positive"), (["--lr-gamma", "1.5"], "--lr-gamma must be in"),
                     (["--deadline", "+x"], "needs a number"), (["--deadline", "+0"], "must be positive"),
                     (["--batch-size", "0"], "--batch-size must be at least 1")):
        with pytest.raises(ValueError, match=msg):
            train_reynet.main(["graphs", *common, *bad, "--output-dir", str(tmp_path / "bad")])
    seen_batch_sizes = set()
    real_batches = rx._size_batches

    def spy(ds, indices, batch_size, gen, *args, **kwargs):
        seen_batch_sizes.add(batch_size)
        return real_batches(ds, indices, batch_size, gen, *args, **kwargs)

    monkeypatch.setattr(rx, "_size_batches", spy)
    train_reynet.main(["graphs", *common, "--graph-epochs", "TOY=1", "--batch-size", "3", "--folds", "0",
                       "--output-dir", str(tmp_path / "b3")])
    b3 = json.loads((tmp_path / "b3" / "reynet_graphs_TOY.json").read_text())
    assert "batch 3 size-bucketed" in b3["protocol"]["schedule"]["TOY"] and seen_batch_sizes == {3}
    assert train_reynet._deadline("+60") == pytest.approx(time.time() + 60, abs=5)
    assert "budget of 60 s" in train_reynet._deadline_text({"deadline_utc": "+60"})
    assert train_reynet._deadline_text({"deadline_utc": "05:17"}) == "; wall-clock deadline 05:17 UTC"
    assert (train_reynet._deadline_text({"deadline_utc": ["05:17", "+60", None]})
            == "; fold-subset runs with wall-clock deadline 05:17 UTC / wall-clock budget of 60 s per process"
               " / no deadline")
