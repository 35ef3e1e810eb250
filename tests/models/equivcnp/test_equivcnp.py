"""EquivCNP / ConvCNP / CNP: exact equivariance, permutation invariance, masks, validation, save/load, Trainer."""

from __future__ import annotations

import pytest
import torch

from hf_koopman.models.equivcnp import (
    CNPConfig,
    CNPModel,
    ConvCNPConfig,
    ConvCNPModel,
    EquivCNPConfig,
    EquivCNPModel,
    NeuralProcessCollator,
    get_group,
)

GROUP_NAMES = ["T1", "T2", "SO2", "RxSO2", "SE2"]


def _tiny(group: str, **kw) -> EquivCNPModel:
    cfg = dict(group=group, hidden_size=12, num_layers=2, kernel_channels=8, kernel_hidden=16, radius=0.25,
               encoder_length_scale=0.3, num_neighbours=24, points_per_unit=16)
    cfg.update(kw)
    model = EquivCNPModel(EquivCNPConfig(**cfg)).eval()
    # larger random weights than the default init, so that outputs vary by O(1) over inputs and a broken
    # equivariance cannot hide below the tolerance
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / p.shape[1] ** 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _task(x_dim: int, b: int = 2, nc: int = 12, nt: int = 25, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cx = torch.rand(b, nc, x_dim, generator=gen) * 1.6 - 0.8
    cy = torch.randn(b, nc, 1, generator=gen)
    tx = torch.rand(b, nt, x_dim, generator=gen) * 1.6 - 0.8
    return cx, cy, tx


@pytest.mark.parametrize("group", GROUP_NAMES)
def test_exact_equivariance_of_mean_and_stddev(group):
    model = _tiny(group)
    g = get_group(group)
    cx, cy, tx = _task(model.config.x_dim)
    with torch.no_grad():
        ref = model(cx, cy, tx)
        assert ref.mean.std() > 0.05 and ref.stddev.std() > 1e-3  # the test is not vacuous
        gen = torch.Generator().manual_seed(11)
        for _ in range(3):
            a = g.random_element(gen)
            out = model(g.act(a, cx), cy, g.act(a, tx))
            torch.testing.assert_close(out.mean, ref.mean, atol=1e-4, rtol=0)
            torch.testing.assert_close(out.stddev, ref.stddev, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("group", "breaker"), [("T2", "rotate"), ("SO2", "translate"), ("RxSO2", "translate"), ("SE2", "scale")])
def test_transformations_outside_the_group_change_the_output(group, breaker):
    """Negative control: the equivariance test above can fail."""
    model = _tiny(group)
    cx, cy, tx = _task(2)
    move = {
        "rotate": lambda x: get_group("SO2").act(torch.tensor([0.9], dtype=torch.float64), x),
        "translate": lambda x: x + torch.tensor([0.3, -0.2]),
        "scale": lambda x: 1.7 * x,
    }[breaker]
    with torch.no_grad():
        diff = (model(move(cx), cy, move(tx)).mean - model(cx, cy, tx).mean).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("group", ["T1", "SO2"])
def test_context_permutation_invariance_and_batch_independence(group):
    model = _tiny(group)
    cx, cy, tx = _task(model.config.x_dim, b=3)
    perm = torch.randperm(cx.shape[1])
    with torch.no_grad():
        ref = model(cx, cy, tx)
        out = model(cx[:, perm], cy[:, perm], tx)
        single = model(cx[1:2], cy[1:2], tx[1:2])
    torch.testing.assert_close(out.mean, ref.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.stddev, ref.stddev, atol=1e-5, rtol=0)
    torch.testing.assert_close(single.mean, ref.mean[1:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: _tiny("T1"), id="equivcnp-T1"),
        pytest.param(lambda: _tiny("SE2"), id="equivcnp-SE2"),
        pytest.param(lambda: ConvCNPModel(ConvCNPConfig(points_per_unit=16, channels=[8, 8])).eval(), id="convcnp"),
        pytest.param(lambda: CNPModel(CNPConfig(hidden_size=16)).eval(), id="cnp"),
    ],
)
def test_masked_points_do_not_matter(model):
    model = model()
    x_dim = model.config.x_dim
    cx, cy, tx = _task(x_dim, b=2, nc=8, nt=10)
    ty = torch.randn(2, 10, 1)
    # pad context with 5 junk points and targets with 4 junk points far away
    junk_cx = torch.full((2, 5, x_dim), 0.3) + torch.randn(2, 5, x_dim)
    cx_p, cy_p = torch.cat([cx, junk_cx], 1), torch.cat([cy, 50 * torch.randn(2, 5, 1)], 1)
    tx_p, ty_p = torch.cat([tx, 0.2 + torch.rand(2, 4, x_dim)], 1), torch.cat([ty, 100 + torch.randn(2, 4, 1)], 1)
    cm = torch.arange(13)[None].expand(2, -1) < 8
    tm = torch.arange(14)[None].expand(2, -1) < 10
    with torch.no_grad():
        ref = model(cx, cy, tx, target_y=ty)
        out = model(cx_p, cy_p, tx_p, context_mask=cm, target_mask=tm, target_y=ty_p)
    torch.testing.assert_close(out.mean[:, :10], ref.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.stddev[:, :10], ref.stddev, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_convcnp_is_translation_equivariant():
    model = ConvCNPModel(ConvCNPConfig(points_per_unit=16, channels=[8, 8])).eval()
    cx, cy, tx = _task(1)
    with torch.no_grad():
        ref = model(cx, cy, tx)
        out = model(cx + 1.37, cy, tx + 1.37)
        cnp = CNPModel(CNPConfig(hidden_size=16)).eval()
        cnp_diff = (cnp(cx + 1.37, cy, tx + 1.37).mean - cnp(cx, cy, tx).mean).abs().max()
    torch.testing.assert_close(out.mean, ref.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.stddev, ref.stddev, atol=1e-4, rtol=0)
    assert cnp_diff > 1e-3  # CNP sees raw coordinates: not equivariant


def test_loss_is_gaussian_nll_and_trains():
    model = _tiny("T1")
    cx, cy, tx = _task(1)
    ty = torch.randn(2, 25, 1)
    out = model(cx, cy, tx, target_y=ty)
    ref = -torch.distributions.Normal(out.mean, out.stddev).log_prob(ty).mean()
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.log_length_scale.grad.abs() > 0


def test_input_validation_messages():
    model = _tiny("T2")
    cx, cy, tx = _task(2)
    with pytest.raises(ValueError, match="x_dim"):
        model(cx[..., :1], cy, tx[..., :1])
    with pytest.raises(ValueError, match="batch"):
        model(cx[0], cy, tx)
    with pytest.raises(ValueError, match="NaN"):
        model(cx.clone().fill_(float("nan")), cy, tx)
    with pytest.raises(ValueError, match="context_mask"):
        model(cx, cy, tx, context_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="target_y"):
        model(cx, cy, tx, target_y=torch.zeros(2, 3, 1))
    with pytest.raises(TypeError, match="floating"):
        model(cx.long(), cy, tx)
    with pytest.raises(ValueError, match="x_dim must be 2"):
        EquivCNPConfig(group="SO2", x_dim=1)
    with pytest.raises(ValueError, match="group must be"):
        EquivCNPConfig(group="SO3")
    with pytest.raises(ValueError, match="grid"):
        EquivCNPConfig(group="T2", discretisation="grid")
    with pytest.raises(ValueError, match="radius"):
        EquivCNPConfig(radius=0)
    with pytest.raises(ValueError, match="max_grid_points"):
        EquivCNPModel(EquivCNPConfig(max_grid_points=50))(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), torch.tensor([[[0.0], [10.0]]]))


def test_grid_convolution_equals_pairwise_lieconv():
    """The T(1) grid fast path (depthwise conv with the PointConv linear folded in) computes the pairwise LieConv."""
    from hf_koopman.models.equivcnp.lieconv import grid_stencil_half_width

    assert grid_stencil_half_width(0.25, 1 / 16) == 3  # 4/16 = 0.25 is on the boundary: window weight 0, left out
    assert grid_stencil_half_width(0.26, 1 / 16) == 4
    assert grid_stencil_half_width(0.01, 1 / 16) == 0
    model = _tiny("T1")
    assert model.uses_grid_convolution()
    cx, cy, tx = _task(1, b=3)
    cmask = torch.ones(3, cx.shape[1], dtype=torch.bool)
    cmask[1, 7:] = False  # padded tasks: grid lengths differ within the batch
    tmask = torch.ones(3, tx.shape[1], dtype=torch.bool)
    tmask[2, 5:] = False
    ty = torch.randn(3, tx.shape[1], 1)
    outs, grads = [], []
    for fast in (True, False):
        model.grid_convolution = fast
        model.zero_grad()
        out = model(cx, cy, tx, cmask, tmask, target_y=ty)
        out.loss.backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert outs[0].mean.std() > 0.05
    torch.testing.assert_close(outs[0].mean, outs[1].mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].stddev, outs[1].stddev, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    # a k-nearest cut inside the window falls back to the pairwise route (the two would differ there)
    assert not _tiny("T1", num_neighbours=6).uses_grid_convolution()
    assert not _tiny("T1", discretisation="context_and_targets").uses_grid_convolution()


def test_truncation_warning(caplog):
    model = EquivCNPModel(EquivCNPConfig(group="T1", radius=1.0, num_neighbours=4, points_per_unit=16))
    cx, cy, tx = _task(1)
    with caplog.at_level("WARNING"):
        model(cx, cy, tx)
    assert "truncates the LieConv window" in caplog.text


def _equivcnp_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("EquivCNP")]


def _clustered(num_neighbours: int, clusters: int = 3) -> tuple[EquivCNPModel, tuple[torch.Tensor, ...]]:
    """Targets (the discretisation) in clusters of 3 points, 0.05 apart and 1 apart between clusters: every window of
    radius 0.25 holds exactly 3 points."""
    model = _tiny("T1", discretisation="targets", num_neighbours=num_neighbours)
    tx = (torch.arange(float(clusters))[:, None] + torch.tensor([0.0, 0.05, 0.1])).reshape(1, 3 * clusters, 1)
    cx = torch.tensor([[[0.02], [1.07], [2.0]]])[:, :clusters]
    return model, (cx, torch.randn(1, clusters, 1, generator=torch.Generator().manual_seed(0)), tx)


@pytest.mark.parametrize("num_neighbours, clusters", [(3, 3), (20, 1)])
def test_no_truncation_warning_when_every_window_is_whole(caplog, num_neighbours, clusters):
    # k = 3 keeps the 3 points of each window (the k-th neighbour lies inside the radius, but no further point
    # does); k = 20 exceeds the 3 points there are. Either way the output equals the one with k = 1000.
    model, inputs = _clustered(num_neighbours, clusters)
    with caplog.at_level("WARNING"), torch.no_grad():
        out = model(*inputs).mean
    assert not _equivcnp_warnings(caplog)
    model.config.num_neighbours = 1000
    with torch.no_grad():
        torch.testing.assert_close(out, model(*inputs).mean, atol=1e-6, rtol=0)  # summation order only


def test_truncation_warning_reports_the_share_and_the_needed_neighbours(caplog):
    model, inputs = _clustered(2)  # 3 points per window, 2 kept: every query is truncated
    with caplog.at_level("WARNING"), torch.no_grad():
        model(*inputs)
        model(*inputs)
    assert caplog.text.count("truncates the LieConv window") == 1  # once per model
    assert "num_neighbours=2" in caplog.text and "for 100% of the query points" in caplog.text
    assert "up to 3 valid points" in caplog.text and "num_neighbours >= 3" in caplog.text


def test_truncation_warning_ignores_padded_targets(caplog):
    # real targets 0.15 apart: each window (radius 0.25) holds at most 3 of them, so k = 3 keeps every window whole;
    # a padded target at 0.225 would have 4 real points in its window, but padding never counts (as query or key)
    model = _tiny("T1", discretisation="targets", num_neighbours=3)
    tx = torch.tensor([[[0.0], [0.15], [0.3], [0.45], [0.225]]])
    cx, cy = torch.tensor([[[0.1]]]), torch.ones(1, 1, 1)
    with caplog.at_level("WARNING"), torch.no_grad():
        model(cx, cy, tx, target_mask=torch.tensor([[True, True, True, True, False]]))
        assert not _equivcnp_warnings(caplog)
        model(cx, cy, tx)  # the same point as a real target: its window is truncated
    assert "num_neighbours >= 5" in caplog.text  # 0.225 then also counts as a key of its neighbours


@pytest.mark.parametrize("cls_cfg", [(EquivCNPModel, lambda: EquivCNPConfig(group="RxSO2", hidden_size=8, num_layers=1)),
                                     (ConvCNPModel, lambda: ConvCNPConfig(channels=[4])),
                                     (CNPModel, lambda: CNPConfig(hidden_size=8))])
def test_save_load_roundtrip_and_auto_classes(tmp_path, cls_cfg):
    import hf_koopman  # noqa: F401  (registers the Auto classes)
    from transformers import AutoConfig, AutoModel

    cls, cfg = cls_cfg
    model = cls(cfg()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(AutoConfig.from_pretrained(tmp_path).to_dict()) == strip(model.config.to_dict())
    x_dim = model.config.x_dim
    cx, cy, tx = _task(x_dim)
    with torch.no_grad():
        a, b = model(cx, cy, tx), loaded(cx, cy, tx)
    torch.testing.assert_close(a.mean, b.mean, atol=0, rtol=0)
    torch.testing.assert_close(a.stddev, b.stddev, atol=0, rtol=0)


def test_collator_and_plain_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(8):  # random sine curves, a few context points and more targets per task (sizes vary)
        nc, nt = (int(v) for v in torch.randint(3, 12, (2,), generator=gen))
        x = torch.rand(nc + nt, 1, generator=gen) * 4 - 2
        a, b = torch.rand(2, generator=gen) * 2
        y = torch.sin(a * x + b)
        tasks.append({"context_x": x[:nc], "context_y": y[:nc], "target_x": x, "target_y": y})
    collated = NeuralProcessCollator()(tasks[:3])
    assert set(collated) == {"context_x", "context_y", "context_mask", "target_x", "target_y", "target_mask"}
    assert collated["context_mask"].sum() == sum(t["context_x"].shape[0] for t in tasks[:3])
    with pytest.raises(ValueError, match="context_y"):
        NeuralProcessCollator()([{"context_x": [[0.0]], "target_x": [[0.0]]}])

    model = EquivCNPModel(EquivCNPConfig(group="T1", hidden_size=8, num_layers=1, points_per_unit=8, radius=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=tasks, data_collator=NeuralProcessCollator())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", ["CNP", "ConvCNP", "EquivCNP"])
def test_non_finite_prediction_names_the_model(name):
    model = {"CNP": lambda: CNPModel(CNPConfig()), "ConvCNP": lambda: ConvCNPModel(ConvCNPConfig()),
             "EquivCNP": lambda: _tiny("T1")}[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    cx, cy, tx = _task(1)
    with pytest.raises(FloatingPointError, match=f"^{name} produced a non-finite prediction"):
        model(cx, cy, tx, target_y=torch.randn(2, 25, 1))


_TINY_MODELS = {
    "EquivCNP": lambda: EquivCNPModel(EquivCNPConfig(group="T1", hidden_size=8, num_layers=1, points_per_unit=8)),
    "CNP": lambda: CNPModel(CNPConfig(hidden_size=8)),
    "ConvCNP": lambda: ConvCNPModel(ConvCNPConfig(channels=[4], points_per_unit=8)),
}


def _sine_tasks(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(n):
        x = torch.rand(3 + i + 5 + i, 1, generator=gen) * 4 - 2
        tasks.append({"context_x": x[: 3 + i], "context_y": torch.sin(3 * x[: 3 + i]), "target_x": x,
                      "target_y": torch.sin(3 * x)})
    return tasks


def _trainer(tmp_path, model, tasks, **kw):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, **kw)
    return Trainer(model=model, args=args, eval_dataset=tasks, data_collator=NeuralProcessCollator())


@pytest.mark.parametrize("name", list(_TINY_MODELS))
def test_trainer_evaluate_reports_eval_loss(tmp_path, name):
    # the target is `target_y`, not `labels`: the `return_loss=True` default tells Trainer that the model computes
    # its own loss, so evaluate() reports it (and metric_for_best_model="loss" / early stopping can use it)
    model = _TINY_MODELS[name]().eval()
    tasks = _sine_tasks()
    trainer = _trainer(tmp_path, model, tasks)
    assert trainer.can_return_loss and trainer.label_names == []
    metrics = trainer.evaluate()
    collate = NeuralProcessCollator()
    with torch.no_grad():
        expected = sum(float(model(**collate(tasks[i : i + 4])).loss) for i in (0, 4)) / 2
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)

    pred = trainer.predict(tasks)  # predictions are (mean, stddev), padded across batches
    assert pred.metrics["test_loss"] == pytest.approx(expected, rel=1e-5)
    mean, stddev = pred.predictions
    assert mean.shape == stddev.shape == (8, max(t["target_x"].shape[0] for t in tasks), 1)


def test_trainer_label_names_and_unlabelled_prediction(tmp_path):
    tasks = _sine_tasks()
    seen = {}

    def compute_metrics(p):
        seen["label_ids"] = p.label_ids
        return {}

    trainer = _trainer(tmp_path, CNPModel(CNPConfig(hidden_size=8)), tasks, label_names=["target_y"])
    trainer.compute_metrics = compute_metrics
    assert "eval_loss" in trainer.evaluate()
    assert seen["label_ids"].shape == (8, 22, 1)  # target_y, padded
    # tasks without target_y: the collator sets return_loss=False, so predict() runs without asking for a loss
    unlabelled = [{k: v for k, v in t.items() if k != "target_y"} for t in tasks]
    assert NeuralProcessCollator()(unlabelled[:2])["return_loss"] is False
    for label_names in (None, ["target_y"]):
        trainer = _trainer(tmp_path, CNPModel(CNPConfig(hidden_size=8)), tasks, label_names=label_names)
        pred = trainer.predict(unlabelled)
        assert pred.predictions[0].shape == (8, 22, 1) and "test_loss" not in pred.metrics


@pytest.mark.parametrize("name", list(_TINY_MODELS))
def test_return_loss_and_return_dict(name):
    model = _TINY_MODELS[name]().eval()
    cx, cy, tx = _task(1)
    ty = torch.randn(2, 25, 1)
    with torch.no_grad():
        out = model(cx, cy, tx, target_y=ty)
        assert out.loss is not None
        assert model(cx, cy, tx, target_y=ty, return_loss=False).loss is None
        loss, mean, stddev = model(cx, cy, tx, target_y=ty, return_dict=False)
        assert isinstance(mean, torch.Tensor)
        torch.testing.assert_close((loss, mean, stddev), (out.loss, out.mean, out.stddev), atol=0, rtol=0)
        assert len(model(cx, cy, tx, return_dict=False)) == 2  # (mean, stddev) without a loss
        model.config.return_dict = False
        assert isinstance(model(cx, cy, tx), tuple)
        assert not isinstance(model(cx, cy, tx, return_dict=True), tuple)  # the argument wins over the config


def test_convcnp_config_refuses_x_dim_other_than_one():
    assert ConvCNPConfig(x_dim=1).x_dim == ConvCNPConfig().x_dim == 1
    with pytest.raises(ValueError, match=r"x_dim must be 1, got 2.*EquivCNPConfig\(group='T2'\)"):
        ConvCNPConfig(x_dim=2)


def test_collator_mixed_target_y_and_dtype():
    with_y = {"context_x": [[0.0]], "context_y": [[0.0]], "target_x": [[1.0]], "target_y": [[1.0]]}
    without_y = {k: v for k, v in with_y.items() if k != "target_y"}
    with pytest.raises(ValueError, match=r"target_y is given for tasks \[0\] but missing for tasks \[1\]"):
        NeuralProcessCollator()([with_y, without_y])
    with pytest.raises(ValueError, match="share the feature dimension"):
        NeuralProcessCollator()([with_y, {**with_y, "context_x": [[0.0, 1.0]]}])

    double = {k: torch.rand(3, 1, dtype=torch.float64) for k in ("context_x", "context_y", "target_x", "target_y")}
    batch = NeuralProcessCollator()([double, {k: v.float() for k, v in double.items()}])
    assert all(batch[k].dtype == torch.get_default_dtype() for k in NeuralProcessCollator.keys)  # the models' dtype
    assert NeuralProcessCollator()([with_y])["context_x"].dtype == torch.get_default_dtype()
    assert NeuralProcessCollator(dtype=torch.float64)([with_y])["target_y"].dtype == torch.float64
    with pytest.raises(TypeError, match="floating torch.dtype"):
        NeuralProcessCollator(dtype=torch.int64)

    model = EquivCNPModel(EquivCNPConfig(hidden_size=8, num_layers=1)).double()
    out = model(**NeuralProcessCollator(dtype=torch.float64)([double]))  # a float64 model trains on float64 tasks
    assert out.mean.dtype == torch.float64 and torch.isfinite(out.loss)
    with pytest.raises(TypeError, match=r"context_x is torch.float32 but the model's weights are torch.float64"):
        model(**NeuralProcessCollator()([double]))


def test_a_float64_target_is_compared_in_the_models_dtype():
    model = EquivCNPModel(EquivCNPConfig(hidden_size=8, num_layers=1))
    x, y = torch.rand(1, 4, 1), torch.rand(1, 4, 1)
    out = model(x, y, x, target_y=y.double())  # target_y never meets the weights
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_the_collator_names_the_task_that_misses_a_key():
    task = {"context_x": [[0.0]], "context_y": [[0.0]], "target_x": [[1.0]]}
    with pytest.raises(ValueError, match=r"each task needs 'target_x'; task 1"):
        NeuralProcessCollator()([task, {k: v for k, v in task.items() if k != "target_x"}])


def test_the_truncation_check_never_changes_the_neighbours_on_a_pixel_grid():
    # equidistant keys tie at the cut on a grid: the chosen neighbours must not depend on whether the check runs
    from hf_koopman.models.equivcnp.groups import get_group
    from hf_koopman.models.equivcnp.lieconv import build_neighbourhood

    side = torch.linspace(-1, 1, 16)
    grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(1, -1, 2)
    group = get_group("T2")
    plain = build_neighbourhood(group, grid, grid, 8)
    checked = build_neighbourhood(group, grid, grid, 8, radius=0.3)
    assert torch.equal(plain.index, checked.index) and bool(checked.cut.any())
    assert int(checked.in_radius.max()) > 8


@pytest.mark.parametrize("build", [lambda: _tiny("T1", discretisation="grid"),
                                   lambda: ConvCNPModel(ConvCNPConfig(hidden_size=8, num_layers=2)).eval(),
                                   lambda: CNPModel(CNPConfig(hidden_size=8)).eval()])
def test_zero_context_points_give_a_finite_prediction_in_1d(build):
    # a 1-D grid around no context points spans the targets (it failed with an IndexError on an empty reduction)
    model = build()
    cx, cy, tx = _task(1)
    out = model(cx[:, :0], cy[:, :0], tx)
    assert out.mean.shape == (2, 25, 1) and torch.isfinite(out.mean).all() and torch.isfinite(out.stddev).all()


def test_a_new_model_starts_at_the_configured_encoder_length_scale():
    model = EquivCNPModel(EquivCNPConfig(group="T2", encoder_length_scale=0.25))
    assert float(model.log_length_scale.exp()) == pytest.approx(0.25)


@pytest.mark.parametrize("mask", [torch.full((1, 4), 0.5), torch.tensor([[1, 2, 1, 0]])], ids=["half", "two"])
def test_masks_with_values_other_than_0_and_1_are_refused(mask):
    """A float mask of 0.5 or an integer 2 would read as True; the message names the fix, 0 / 1 masks of any dtype
    read as booleans."""
    model = ConvCNPModel(ConvCNPConfig()).eval()
    cx, tx = torch.rand(1, 4, 1), torch.rand(1, 6, 1)
    with pytest.raises(ValueError, match=r"context_mask marks real points .* e.g. context_mask > 0.5"):
        model(cx, torch.sin(cx), tx, context_mask=mask)
    ones = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(model(cx, torch.sin(cx), tx, context_mask=ones).mean,
                               model(cx, torch.sin(cx), tx, context_mask=ones.bool()).mean)


def test_the_input_checks_stay_out_of_a_compiled_graph_and_the_meta_device():
    """The value checks (finite inputs, 0 / 1 masks, a valid target per task, a finite prediction) read tensors on
    the host: skipped while `torch.compile` traces and on the meta device, as ReyNet's are."""
    model = CNPModel(CNPConfig()).eval()
    cx, tx = torch.rand(2, 5, 1), torch.rand(2, 7, 1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # a data-dependent branch would fail here
    torch.testing.assert_close(compiled(cx, torch.sin(cx), tx, target_mask=mask, target_y=torch.cos(tx)).loss,
                               model(cx, torch.sin(cx), tx, target_mask=mask, target_y=torch.cos(tx)).loss)
    with torch.device("meta"):
        meta = CNPModel(CNPConfig())
        out = meta(torch.rand(2, 5, 1), torch.rand(2, 5, 1), torch.rand(2, 7, 1), target_y=torch.rand(2, 7, 1))
    assert out.mean.shape == (2, 7, 1) and out.mean.device.type == "meta"


def test_loading_weights_for_another_group_warns(tmp_path, caplog):
    """An override of `group` at load (a keyword or a config=) keeps weights trained for another group: it loads, as
    transformers' overrides do, with a warning naming both groups and how to build a fresh model instead."""
    from transformers import AutoModel

    EquivCNPModel(EquivCNPConfig(group="SO2")).save_pretrained(tmp_path)
    loads = {
        "keyword": lambda: EquivCNPModel.from_pretrained(tmp_path, group="SE2"),
        "config": lambda: EquivCNPModel.from_pretrained(tmp_path, config=EquivCNPConfig(group="SE2")),
        "auto": lambda: AutoModel.from_pretrained(tmp_path, group="SE2"),
    }
    for how, load in loads.items():
        caplog.clear()
        with caplog.at_level("WARNING"):
            model = load()
        assert model.config.group == "SE2", how
        assert "trained for group='SO2'" in caplog.text and "group='SE2'" in caplog.text, how
    caplog.clear()
    with caplog.at_level("WARNING"):
        EquivCNPModel.from_pretrained(tmp_path, group="SO2")  # the saved group: nothing to say
        EquivCNPModel.from_pretrained(tmp_path)
    assert "trained for group" not in caplog.text
    # weights passed in memory, with no path: nothing to compare with, and nothing is looked up (no Hub request)
    from unittest import mock

    state = EquivCNPModel(EquivCNPConfig(group="SE2")).state_dict()
    with mock.patch.object(EquivCNPConfig, "get_config_dict", side_effect=AssertionError("looked up")):
        model = EquivCNPModel.from_pretrained(None, config=EquivCNPConfig(group="SE2"), state_dict=state)
    assert model.config.group == "SE2"


def test_float64_tasks_under_autocast_and_hf_style_labels_are_refused_with_the_fix():
    torch.manual_seed(0)
    model = CNPModel(CNPConfig())
    task = {"context_x": torch.randn(1, 5, 1, dtype=torch.float64), "context_y": torch.randn(1, 5, 1, dtype=torch.float64),
            "target_x": torch.randn(1, 4, 1, dtype=torch.float64)}
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"cast the inputs with"):
        model(**task)
    with pytest.raises(ValueError, match="rename the key to target_y"):
        NeuralProcessCollator()([{"context_x": [[0.0]], "context_y": [[1.0]], "target_x": [[0.5]], "labels": [[1.0]]}])
