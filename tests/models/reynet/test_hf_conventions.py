"""ReyNet follows the transformers conventions: Trainer predictions, checkpointing modes, label handling
(`problem_type`), `return_dict`, and a public collator / graph-tensor builder for graphs of different sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_koopman  # noqa: F401  (registers the Auto classes)
from hf_koopman.models.reynet import (
    ReyNetConfig,
    ReyNetForEquivariantRegression,
    ReyNetForGraphClassification,
    ReyNetForInvariantRegression,
    ReyNetGraphCollator,
    ReyNetModel,
    build_graph_tensor,
)

TINY = dict(in_channels=2, phi_hidden_sizes=[8], channel_hidden_sizes=[8], head_hidden_sizes=[8])
HEADS = [ReyNetModel, ReyNetForGraphClassification, ReyNetForInvariantRegression, ReyNetForEquivariantRegression]


def _graphs(sizes, C=2, seed=0):
    """Items `{"graph_tensor": (C, n, n), "labels": int}`; the label is a learnable function of the graph."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n in sizes:
        X = torch.rand(C, n, n, generator=gen)
        items.append({"graph_tensor": X, "labels": int(X[0].diagonal().mean() > 0.5)})
    return items


def _training_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, **kw)


def _accuracy(p):
    return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}


# ----------------------------------------------------------------------------------------------------------------------
# 1. Trainer.evaluate: predictions are the logits
# ----------------------------------------------------------------------------------------------------------------------
def test_trainer_evaluate_gives_logits_to_compute_metrics(tmp_path):
    from transformers import Trainer

    torch.manual_seed(0)
    items = _graphs([6] * 12)
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY, num_labels=2))
    trainer = Trainer(model=model, args=_training_args(tmp_path, max_steps=2), train_dataset=items,
                      eval_dataset=items, compute_metrics=_accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    pred = trainer.predict(items)
    assert isinstance(pred.predictions, np.ndarray) and pred.predictions.shape == (12, 2)
    with torch.no_grad():
        logits = model.eval()(torch.stack([it["graph_tensor"] for it in items])).logits
    np.testing.assert_allclose(pred.predictions, logits.numpy(), rtol=1e-5, atol=1e-6)


def test_keys_to_ignore_at_inference_is_not_saved(tmp_path):
    config = ReyNetConfig(**TINY)
    assert config.keys_to_ignore_at_inference == ["pooler_output"]
    config.save_pretrained(tmp_path)
    assert "keys_to_ignore_at_inference" not in json.loads((tmp_path / "config.json").read_text())


# ----------------------------------------------------------------------------------------------------------------------
# 2. checkpointing: every parameter gets its gradient in both modes
# ----------------------------------------------------------------------------------------------------------------------
def _grads(model, X, mask, labels):
    model.zero_grad(set_to_none=True)
    model(X, node_mask=mask, labels=labels).loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("variant", [dict(phi_mode="joint", num_reynolds_layers=2), dict(layer_type="iegn")],
                         ids=["reynolds", "iegn"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpointing_gives_every_parameter_its_gradient(variant, reentrant):
    model = ReyNetForGraphClassification(ReyNetConfig(**{**TINY, **variant}, num_labels=3)).double().train()
    X = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    labels = torch.tensor([0, 2, 1])
    plain = _grads(model, X, mask, labels)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ckpt = _grads(model, X, mask, labels)
    assert not X.requires_grad and X.grad is None  # the caller's tensor is left alone
    missing = [k for k, g in ckpt.items() if g is None]
    assert not missing, f"no gradient with use_reentrant={reentrant}: {missing}"
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-10, atol=1e-12, msg=k)
    with torch.no_grad():  # inference under checkpointing is unaffected
        assert not model(X, node_mask=mask).logits.requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# 3. labels of the classification head: transformers' problem_type convention, explicit shape errors
# ----------------------------------------------------------------------------------------------------------------------
def _classifier(num_labels=2, problem_type=None):
    torch.manual_seed(0)
    return ReyNetForGraphClassification(ReyNetConfig(**TINY, num_labels=num_labels, problem_type=problem_type))


X2 = torch.rand(2, 2, 5, 5)


def test_integer_labels_infer_single_label_classification():
    model = _classifier(3)
    out = model(X2, labels=torch.tensor([0, 2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(model(X2, labels=torch.tensor([[0], [2]])).loss, out.loss)  # (B, 1) as in transformers


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_multi_hot_labels_use_bce(problem_type):
    model = _classifier(2, problem_type)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = model(X2, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels))
    assert model.config.problem_type == "multi_label_classification"
    if problem_type is not None:  # integer multi-hot labels are fine once the problem type says multi-label
        torch.testing.assert_close(model(X2, labels=labels.long()).loss, out.loss)


@pytest.mark.parametrize("shape", [(2,), (2, 1)])
def test_one_label_is_regression(shape):
    model = _classifier(1)
    labels = torch.tensor([0.5, 2.0]).reshape(shape)
    out = model(X2, labels=labels)
    assert out.logits.shape == (2, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits, labels.reshape(2, 1)))
    assert model.config.problem_type == "regression"


def test_explicit_regression_with_several_outputs():
    model = _classifier(3, "regression")
    labels = torch.rand(2, 3)
    out = model(X2, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits, labels))
    with pytest.raises(ValueError, match=r"\(batch_size, num_labels\) = \(2, 3\), got \(6,\)"):
        model(X2, labels=torch.rand(6))


def test_integer_multi_hot_labels_without_problem_type_name_the_fix():
    model = _classifier(2)
    with pytest.raises(ValueError, match=r"got \(2, 2\).*multi_label_classification.*inferred"):
        model(X2, labels=torch.tensor([[1, 0], [1, 1]]))
    assert model.config.problem_type is None  # a failed inference is not recorded


def test_label_errors_state_expected_and_got():
    with pytest.raises(ValueError, match="integer class indices, got torch.float32"):
        _classifier(2, "single_label_classification")(X2, labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(batch_size,\) = \(2,\), got \(4,\)"):
        _classifier(2, "single_label_classification")(X2, labels=torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"\(batch_size, num_labels\) = \(2, 2\), got \(2,\)"):
        _classifier(2, "multi_label_classification")(X2, labels=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="problem_type='ranking' is not one of"):
        ReyNetConfig(problem_type="ranking")
    model = _classifier(2)
    model.config.problem_type = "ranking"
    with pytest.raises(ValueError, match="problem_type='ranking' is not one of"):
        model(X2, labels=torch.tensor([0, 1]))


def test_invariant_regression_label_shapes():
    torch.manual_seed(0)
    model = ReyNetForInvariantRegression(ReyNetConfig(**TINY, num_targets=2))
    out = model(X2, labels=torch.ones(2, 2))
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits, torch.ones(2, 2)))
    for bad in [(4,), (2,), (2, 3), (1, 2, 2)]:  # (B*T,) was silently reshaped before
        with pytest.raises(ValueError, match=re.escape(f"(batch_size, num_targets) = (2, 2), got {bad}")):
            model(X2, labels=torch.ones(bad))
    one = ReyNetForInvariantRegression(ReyNetConfig(**TINY, num_targets=1))
    torch.testing.assert_close(one(X2, labels=torch.ones(2)).loss, one(X2, labels=torch.ones(2, 1)).loss)


# ----------------------------------------------------------------------------------------------------------------------
# 4. graphs of different sizes: the public collator and graph-tensor builder
# ----------------------------------------------------------------------------------------------------------------------
def test_collator_pads_and_masks():
    items = _graphs([3, 5, 4])
    items[1]["graph_tensor"] = items[1]["graph_tensor"].numpy()  # arrays and nested lists work too
    items[2]["graph_tensor"] = items[2]["graph_tensor"].tolist()
    batch = ReyNetGraphCollator()(items)
    assert batch["graph_tensor"].shape == (3, 2, 5, 5) and batch["graph_tensor"].dtype == torch.float32
    assert batch["node_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 4 + [False]]
    assert batch["labels"].tolist() == [it["labels"] for it in items] and batch["labels"].dtype == torch.long
    torch.testing.assert_close(batch["graph_tensor"][0, :, :3, :3], items[0]["graph_tensor"])
    assert (batch["graph_tensor"][0, :, 3:] == 0).all() and (batch["graph_tensor"][0, :, :, 3:] == 0).all()
    assert ReyNetGraphCollator(pad_to_multiple_of=4)(items)["graph_tensor"].shape == (3, 2, 8, 8)


def test_collator_labels_aliases_vectors_matrices_and_own_masks():
    collate = ReyNetGraphCollator()
    g3, g4 = torch.rand(2, 3, 3), torch.rand(2, 4, 4)
    assert "labels" not in collate([{"graph_tensor": g3}, {"graph_tensor": g4}])
    assert collate([{"graph_tensor": g3, "label": 1}, {"graph_tensor": g4, "label": 0}])["labels"].tolist() == [1, 0]
    vec = collate([{"graph_tensor": g3, "labels": [1.0, 0.0]}, {"graph_tensor": g4, "labels": [0.0, 1.0]}])
    assert vec["labels"].shape == (2, 2)
    t3, t4 = torch.rand(2, 3, 3), torch.rand(2, 4, 4)  # equivariant targets are padded like the graphs
    mat = collate([{"graph_tensor": g3, "labels": t3}, {"graph_tensor": g4, "labels": t4}])["labels"]
    assert mat.shape == (2, 2, 4, 4) and torch.equal(mat[0, :, :3, :3], t3) and (mat[0, :, 3:] == 0).all()
    own = collate([{"graph_tensor": g3, "node_mask": [True, False, True]}, {"graph_tensor": g4}])["node_mask"]
    assert own.tolist() == [[True, False, True, False], [True] * 4]


def test_collator_errors():
    collate = ReyNetGraphCollator()
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="item 1 has 3"):
        collate([{"graph_tensor": torch.rand(2, 3, 3)}, {"graph_tensor": torch.rand(3, 3, 3)}])
    with pytest.raises(ValueError, match=r"item 0: graph_tensor must have shape \(C, n, n\), got \(3, 3\)"):
        collate([{"graph_tensor": torch.rand(3, 3)}])
    with pytest.raises(ValueError, match="no 'graph_tensor'.*build_graph_tensor"):
        collate([{"x": torch.rand(2, 3, 3)}])
    with pytest.raises(ValueError, match="label every item or none"):
        collate([{"graph_tensor": torch.rand(2, 3, 3), "labels": 1}, {"graph_tensor": torch.rand(2, 4, 4)}])
    with pytest.raises(ValueError, match="share a shape"):
        collate([{"graph_tensor": torch.rand(2, 3, 3), "labels": [1.0]}, {"graph_tensor": torch.rand(2, 4, 4),
                                                                          "labels": [1.0, 2.0]}])
    with pytest.raises(ValueError, match=r"node_mask must have shape \(n_i,\) = \(3,\)"):
        collate([{"graph_tensor": torch.rand(2, 3, 3), "node_mask": [True, True]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        ReyNetGraphCollator(pad_to_multiple_of=0)
    # class names (a datasets.Dataset's string column) are refused with the mapping to make, not torch's "too many
    # dimensions 'str'"
    for label in ("mutagenic", ["a", "b"], np.array(["a", "b"]), np.array(["a"], dtype=object), [1, [2, "x"]]):
        with pytest.raises(TypeError, match=r"item 1 .*labels must be numbers.*label2id.*class_encode_column"):
            collate([{"graph_tensor": torch.rand(2, 3, 3), "labels": 0}, {"graph_tensor": torch.rand(2, 3, 3),
                                                                          "labels": label}])


@pytest.mark.parametrize("cls", [ReyNetForGraphClassification, ReyNetForEquivariantRegression])
def test_collated_batch_equals_each_graph_alone(cls):
    torch.manual_seed(0)
    model = cls(ReyNetConfig(**TINY, phi_mode="joint", num_labels=3)).double().eval()
    items = [{"graph_tensor": it["graph_tensor"].double()} for it in _graphs([4, 7, 5])]
    batch = ReyNetGraphCollator(dtype=torch.float64)(items)
    with torch.no_grad():
        padded = model(**batch).logits
        for i, it in enumerate(items):
            alone = model(it["graph_tensor"][None]).logits[0]
            n = it["graph_tensor"].shape[-1]
            torch.testing.assert_close(padded[i, :, :n, :n] if padded.dim() == 4 else padded[i], alone)


def test_trainer_trains_and_evaluates_graphs_of_different_sizes(tmp_path):
    from transformers import Trainer

    torch.manual_seed(0)
    items = _graphs([4 + i % 4 for i in range(16)])
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY, num_labels=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=_training_args(tmp_path, max_steps=3), train_dataset=items,
                      eval_dataset=items, data_collator=ReyNetGraphCollator(), compute_metrics=_accuracy)
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert 0.0 <= trainer.evaluate()["eval_accuracy"] <= 1.0
    pred = trainer.predict(items).predictions  # padded batches give each graph's own logits
    with torch.no_grad():
        alone = torch.cat([model.eval()(it["graph_tensor"][None]).logits for it in items])
    np.testing.assert_allclose(pred, alone.numpy(), rtol=1e-4, atol=1e-5)


def test_build_graph_tensor_adjacency_and_features():
    A = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # weighted, directed: kept as is
    feats = torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 3.0]])
    T = build_graph_tensor(adjacency=A, node_features=feats, normalize=False)
    assert T.shape == (3, 3, 3)
    torch.testing.assert_close(T[0], A)
    torch.testing.assert_close(T[1:], A + torch.diag_embed(feats.T))
    assert build_graph_tensor([[0], [1]], num_nodes=3).shape == (1, 3, 3)
    assert build_graph_tensor([], num_nodes=2).abs().sum() == 0  # no edges
    assert build_graph_tensor(adjacency=A, dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(), "exactly one of edge_index"),
        (dict(edge_index=[[0, 1]], adjacency=torch.eye(2)), "exactly one of edge_index"),
        (dict(edge_index=[[0, 1]]), "pass num_nodes"),
        (dict(edge_index=[[0, 1], [1, 2], [2, 0]], num_nodes=3), r"shape \(2, E\).*got torch.int64 of shape \(3, 2\)"),
        (dict(edge_index=[[0], [3]], num_nodes=3), r"outside \[0, 3\)"),
        (dict(adjacency=torch.eye(2), num_nodes=3), r"adjacency must have shape \(n, n\) = \(3, 3\)"),
        (dict(adjacency=torch.eye(2), node_labels=[0, 1]), "needs num_node_labels"),
        (dict(adjacency=torch.eye(2), node_labels=[0, 4], num_node_labels=3), r"\[0, num_node_labels=3\)"),
        (dict(adjacency=torch.eye(2), node_labels=[0, 1, 1], num_node_labels=3), "must be 2 integers"),
        (dict(adjacency=torch.eye(2), node_features=torch.ones(3, 1)), r"\(n, F\) = \(2, F\)"),
        (dict(adjacency=torch.eye(2), node_labels=[0, 1], num_node_labels=2, node_features=torch.ones(2, 1)),
         "not both"),
    ],
)
def test_build_graph_tensor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_graph_tensor(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# 5. return_dict
# ----------------------------------------------------------------------------------------------------------------------
def _head_inputs(cls):
    labels = {ReyNetModel: None, ReyNetForGraphClassification: torch.tensor([0, 1]),
              ReyNetForInvariantRegression: torch.rand(2, 1), ReyNetForEquivariantRegression: torch.rand(2, 1, 5, 5)}
    return {} if labels[cls] is None else {"labels": labels[cls]}


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_return_dict_argument_and_config(cls):
    torch.manual_seed(0)
    model = cls(ReyNetConfig(**TINY)).eval()
    kw = _head_inputs(cls)
    with torch.no_grad():
        as_dict = model(X2, output_hidden_states=True, **kw)
        as_tuple = model(X2, output_hidden_states=True, return_dict=False, **kw)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
        for a, b in zip(as_tuple, as_dict.to_tuple()):
            torch.testing.assert_close(a, b)
        if "labels" in kw:
            torch.testing.assert_close(as_tuple[0], as_dict.loss)  # the loss comes first, as in transformers
        model.config.return_dict = False
        assert isinstance(model(X2, **kw), tuple)
        assert type(model(X2, return_dict=True, **kw)) is type(as_dict)  # the argument wins over the config


def test_the_collator_casts_to_the_models_dtype():
    import numpy as np

    items = [{"graph_tensor": np.random.rand(2, n, n)} for n in (3, 5)]  # float64 NumPy arrays
    assert ReyNetGraphCollator()(items)["graph_tensor"].dtype == torch.get_default_dtype()
    assert ReyNetGraphCollator(dtype=torch.float64)(items)["graph_tensor"].dtype == torch.float64
    with pytest.raises(TypeError, match="floating torch.dtype"):
        ReyNetGraphCollator(dtype=torch.int64)


def test_label_edge_cases_of_the_classification_head():
    torch.manual_seed(0)
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY, num_labels=3))
    one = model(torch.rand(1, 2, 4, 4), labels=torch.tensor(2))  # a 0-d label for a batch of one
    assert torch.isfinite(one.loss)
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY, num_labels=3))
    with pytest.raises(ValueError, match=r"in \[0, 1\].*problem_type='regression'"):
        model(torch.rand(2, 2, 4, 4), labels=torch.tensor([[0.0, 5.0, 2.0], [1.0, 0.0, 3.0]]))
    assert model.config.problem_type is None  # a failed guess is not stored
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):  # NaN is not a probability either
        model(torch.rand(1, 2, 4, 4), labels=torch.tensor([[0.0, float("nan"), 1.0]]))


@pytest.mark.parametrize("shape", [(1, 8, 0, 0), (0, 8, 5, 5)])
def test_an_empty_graph_or_batch_gets_finite_logits_of_the_right_shape(shape):
    # the shipped MUTAG config failed in a reshape(-1) of an empty tensor (the default config did not)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(__file__).resolve().parents[3] / "checkpoints" / "reynet-mutag")
    model = ReyNetForGraphClassification(config).eval()
    logits = model(torch.rand(*shape)).logits
    assert logits.shape == (shape[0], config.num_labels) and torch.isfinite(logits).all()
