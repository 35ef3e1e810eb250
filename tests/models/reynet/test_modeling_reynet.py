"""ReyNet models: symmetry under permutations (with node masks), padding independence, heads, save/load, config."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import hf_koopman  # noqa: F401  (registers the Auto classes)
from hf_koopman.models.reynet import (
    ReyNetConfig,
    ReyNetForEquivariantRegression,
    ReyNetForGraphClassification,
    ReyNetForInvariantRegression,
    ReyNetModel,
)

TINY = dict(in_channels=3, num_labels=3, num_targets=2, phi_hidden_sizes=[8], channel_hidden_sizes=[6, 5],
            head_hidden_sizes=[7], reynolds_channels=4)
VARIANTS = [
    dict(layer_type="reynolds", phi_mode="depthwise"),
    dict(layer_type="reynolds", phi_mode="joint", num_reynolds_layers=2, skip_connection=False),
    dict(layer_type="reynolds", phi_mode="joint", channel_hidden_sizes=[], pooling="mean"),
    dict(layer_type="iegn"),
    dict(layer_type="reynolds", phi_mode="joint", design_order=3),
]
HEADS = [ReyNetModel, ReyNetForGraphClassification, ReyNetForInvariantRegression, ReyNetForEquivariantRegression]


def _output(model, X, mask=None):
    out = model(X, node_mask=mask)
    return out.last_hidden_state if isinstance(model, ReyNetModel) else out.logits


def _batch(n=6, B=3):
    X = torch.rand(B, 3, n, n, dtype=torch.float64)
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 4:] = False  # graph 1 has 4 nodes
    mask[2, 2:] = False  # graph 2 has 2 nodes
    return X, mask


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in list(v)[:2]))
@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_permutation_symmetry_with_masks(cls, variant):
    model = cls(ReyNetConfig(**{**TINY, **variant})).double().eval()
    X, mask = _batch()
    perm = torch.randperm(X.shape[-1])
    Y = _output(model, X, mask)
    Yp = _output(model, X[:, :, perm][:, :, :, perm], mask[:, perm])
    if Y.dim() == 4:  # equivariant
        torch.testing.assert_close(Y[:, :, perm][:, :, :, perm], Yp)
    else:  # invariant
        torch.testing.assert_close(Y, Yp)
    # not trivially constant: a different input changes the output
    assert not torch.allclose(Y, _output(model, X.flip(-1), mask))


@pytest.mark.parametrize("variant", VARIANTS[:2] + VARIANTS[3:], ids=["depthwise", "joint", "iegn", "triples"])
def test_padding_never_reaches_real_nodes(variant):
    model = ReyNetForEquivariantRegression(ReyNetConfig(**{**TINY, **variant})).double().eval()
    X, mask = _batch()
    garbage = X.clone()
    garbage[1, :, 4:, :] = 1e3
    garbage[1, :, :, 4:] = float("nan")
    Y, Yg = _output(model, X, mask), _output(model, garbage, mask)
    torch.testing.assert_close(Y, Yg)
    assert (Y[1, :, 4:, :] == 0).all() and (Y[1, :, :, 4:] == 0).all()
    # a padded graph equals the same graph alone (the 1/(n-1) uses the real n)
    alone = _output(model, X[1:2, :, :4, :4])
    torch.testing.assert_close(Y[1:2, :, :4, :4], alone)


def test_layer_matches_reductive_reynolds_contract():
    """With skip off and no channel MLP, a depthwise ReyNet block is exactly reductive_reynolds(φ per channel)."""
    from hf_koopman.models.reynet import reductive_reynolds

    model = ReyNetModel(ReyNetConfig(in_channels=2, skip_connection=False, channel_hidden_sizes=[], phi_hidden_sizes=[5]))
    model = model.double().eval()
    phi = model.blocks[0].phi

    def pair_fn(blocks):  # (..., 4C) channel-major -> (..., 2C): [φ₀ of each channel, φ₁ of each channel]
        out = phi(blocks.reshape(*blocks.shape[:-1], 2, 4))
        return torch.cat((out[..., 0], out[..., 1]), dim=-1)

    X = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model(X).last_hidden_state, reductive_reynolds(pair_fn, X))


@pytest.mark.parametrize("hidden", [[7], []])
def test_joint_layer_matches_reductive_reynolds_contract(hidden):
    """Joint φ (computed without materialising blocks) equals reductive_reynolds(φ) on channel-major blocks."""
    from hf_koopman.models.reynet import reductive_reynolds

    cfg = ReyNetConfig(in_channels=3, phi_mode="joint", reynolds_channels=2, skip_connection=False,
                       channel_hidden_sizes=[], phi_hidden_sizes=hidden)
    model = ReyNetModel(cfg).double().eval()
    X = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(X).last_hidden_state, reductive_reynolds(model.blocks[0].phi, X))


@pytest.mark.parametrize("hidden", [[7], [6, 5]])
@pytest.mark.parametrize("masked", [False, True])
def test_triple_design_matches_reductive_reynolds_k(hidden, masked):
    """design_order=3: the block's Reynolds part is `reductive_reynolds_k(φ, X, 3, out_rank=2)` for a Φ that writes
    φ₀ at (0, 0) and φ₁ at (0, 1), divided entry-wise by its number of terms ((n−1)(n−2) on the diagonal, n−2 off
    it), with the real n of each graph under padding; and the literal n!-term operator agrees."""
    from hf_koopman.models.reynet import full_reynolds_k, reductive_reynolds_k

    C, c_out, n = 3, 2, 6
    cfg = ReyNetConfig(in_channels=C, phi_mode="joint", reynolds_channels=c_out, skip_connection=False,
                       channel_hidden_sizes=[], phi_hidden_sizes=hidden, design_order=3)
    model = ReyNetModel(cfg).double().eval()
    phi = model.blocks[0].phi

    def Phi(sub):  # (B, T, C, 9) channel-major 3x3 blocks -> (B, T, C', 9), zero except local (0,0) and (0,1)
        o = phi(sub.reshape(*sub.shape[:2], -1))
        out = o.new_zeros(*sub.shape[:2], c_out, 9)
        out[..., 0], out[..., 1] = o[..., :c_out], o[..., c_out:]
        return out

    def expected(X):
        m = X.shape[-1]
        terms = torch.full((m, m), m - 2.0, dtype=X.dtype)
        terms.fill_diagonal_(float((m - 1) * (m - 2)))
        return reductive_reynolds_k(Phi, X, 3, out_rank=2) / terms

    X = torch.randn(2, C, n, n, dtype=torch.float64)
    if not masked:
        Y = model(X).last_hidden_state
        torch.testing.assert_close(Y, expected(X))
        torch.testing.assert_close(full_reynolds_k(Phi, X[:, :, :5, :5], 3, out_rank=2),
                                   reductive_reynolds_k(Phi, X[:, :, :5, :5], 3, out_rank=2))
    else:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, 4:] = False
        Y = model(X, node_mask=mask).last_hidden_state
        torch.testing.assert_close(Y[:1], expected(X[:1]))
        torch.testing.assert_close(Y[1:, :, :4, :4], expected(X[1:, :, :4, :4]))
        assert (Y[1, :, 4:, :] == 0).all() and (Y[1, :, :, 4:] == 0).all()


def test_triple_design_with_fewer_than_three_nodes_is_zero_not_nan():
    """An empty sum over third nodes (a graph with 1 or 2 real nodes) gives Y = 0 from the Reynolds part."""
    cfg = ReyNetConfig(in_channels=2, phi_mode="joint", phi_hidden_sizes=[4], skip_connection=False,
                       channel_hidden_sizes=[], design_order=3)
    model = ReyNetModel(cfg).double().eval()
    for n in (1, 2):
        Y = model(torch.randn(1, 2, n, n, dtype=torch.float64)).last_hidden_state
        assert torch.isfinite(Y).all() and (Y == 0).all()


def test_losses_and_shapes():
    cfg = ReyNetConfig(**TINY)
    X, mask = _batch()
    out = ReyNetForGraphClassification(cfg)(X.float(), node_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0 and out.loss.requires_grad
    out = ReyNetForInvariantRegression(cfg)(X.float(), node_mask=mask, labels=torch.rand(3, 2))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)
    model = ReyNetForEquivariantRegression(cfg)
    target = torch.rand(3, 2, 6, 6)
    out = model(X.float(), node_mask=mask, labels=target)
    # loss only over real entries: changing targets at padded entries does not change it
    target2 = target.clone()
    target2[2, :, 2:, :] = 100.0
    assert torch.allclose(out.loss, model(X.float(), node_mask=mask, labels=target2).loss)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(X.float(), labels=torch.rand(3, 6, 6))
    base = ReyNetModel(cfg)(X.float(), output_hidden_states=True)
    assert base.pooler_output.shape == (3, 2 * cfg.hidden_channels)
    assert len(base.hidden_states) == 2 and base.hidden_states[0].shape == (3, 3, 6, 6)


def test_input_errors():
    model = ReyNetModel(ReyNetConfig(**TINY))
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.rand(2, 2, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, C, n, n\)"):
        model(torch.rand(2, 3, 5, 4))
    with pytest.raises(ValueError, match="node_mask"):
        model(torch.rand(2, 3, 5, 5), node_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(2, 3, 5, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(layer_type="gcn"), "layer_type"),
        (dict(phi_mode="mixed"), "phi_mode"),
        (dict(phi_hidden_sizes=[8, -1]), "phi_hidden_sizes"),
        (dict(channel_hidden_sizes="16"), "channel_hidden_sizes"),
        (dict(layer_type="iegn", channel_hidden_sizes=[]), "must not be empty"),
        (dict(pooling="max"), "pooling"),
        (dict(head_dropout=1.5), "head_dropout"),
        (dict(hidden_act="swish2"), "hidden_act"),
        (dict(num_targets=True), "num_targets"),
        (dict(skip_connection="yes"), "skip_connection"),
        (dict(reynolds_channels=0), "reynolds_channels"),
        (dict(design_order=4), "design_order"),
        (dict(design_order=True), "design_order"),
        (dict(design_order=3), "phi_mode='joint'"),  # the default φ is depthwise
        (dict(design_order=3, phi_mode="joint", phi_hidden_sizes=[]), "non-empty phi_hidden_sizes"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReyNetConfig(**kwargs)


def test_single_label_classification_needs_two_labels():
    """num_labels=1 is a regression head by transformers' convention; only an explicit single-label one is refused."""
    config = ReyNetConfig(num_labels=2, problem_type="single_label_classification")
    config.num_labels = 1  # transformers' own check only runs when the config is built
    with pytest.raises(ValueError, match=r"num_labels >= 2.*num_labels=2.*ReyNetForInvariantRegression"):
        ReyNetForGraphClassification(config)
    assert ReyNetForGraphClassification(ReyNetConfig(num_labels=1)).classifier.mlp[-1].out_features == 1


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    X, mask = _batch()
    X = X.float()
    loaded = ReyNetForGraphClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(X, node_mask=mask).logits, model(X, node_mask=mask).logits, rtol=0, atol=0)
    # registered with the Auto classes on `import hf_koopman` (no trust_remote_code needed)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ReyNetConfig)
    auto_cls = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(auto_cls) is ReyNetForGraphClassification
    torch.testing.assert_close(auto_cls(X, node_mask=mask).logits, model(X, node_mask=mask).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is ReyNetModel
    torch.testing.assert_close(
        base(X, node_mask=mask).last_hidden_state, model.reynet(X, node_mask=mask).last_hidden_state
    )


def test_plain_trainer_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_koopman.models.reynet import ReyNetGraphCollator

    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(24):
        n = 4 + i % 3
        X = torch.rand(3, n, n, generator=gen)
        items.append({"graph_tensor": X, "labels": int(X.diagonal(dim1=-2, dim2=-1)[0].sum() > n / 2)})
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=ReyNetGraphCollator())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "Trainer did not update any parameter"


def _graph_items(count=24):
    gen = torch.Generator().manual_seed(0)
    return [{"graph_tensor": torch.rand(3, 4 + i % 3, 4 + i % 3, generator=gen), "labels": i % 2} for i in range(count)]


@pytest.mark.parametrize("layer_type", ["reynolds", "iegn"])
def test_rksp_and_kss_refuse_pair_tensors_and_the_guard_still_runs(tmp_path, layer_type):
    # the blocks map (B, n, n, C): read as (B, C, H, W) feature maps, their "width" would be the node count
    from hf_koopman import KSSTrainer, KSSTrainingArguments, RKSPCallback, profile
    from hf_koopman.models.reynet import ReyNetGraphCollator

    model = ReyNetForGraphClassification(ReyNetConfig(**{**TINY, "layer_type": layer_type}))
    X, mask = _batch()
    with pytest.raises(ValueError, match="not a stream of token states.*profile_at_init=False"):
        profile(model, {"graph_tensor": X.float(), "node_mask": mask})
    common = dict(per_device_train_batch_size=8, max_steps=2, report_to=[], save_strategy="no", use_cpu=True,
                  remove_unused_columns=False)
    kss = KSSTrainer(model=model, args=KSSTrainingArguments(str(tmp_path / "kss"), kss_every_n_steps=1, **common),
                     train_dataset=_graph_items(), data_collator=ReyNetGraphCollator())
    with pytest.raises(ValueError, match="KSS penalty do not apply"):
        kss.train()
    from transformers import Trainer, TrainingArguments

    guarded = Trainer(model=model, args=TrainingArguments(str(tmp_path / "guard"), **common),
                      train_dataset=_graph_items(), data_collator=ReyNetGraphCollator(),
                      callbacks=[RKSPCallback(profile_at_init=False)])
    assert torch.isfinite(torch.tensor(guarded.train().training_loss))


def test_auto_map_is_complete():
    import importlib

    from hf_koopman.models.reynet import AUTO_MAP

    targets = set()
    for key, ref in AUTO_MAP.items():
        module, cls = ref.rsplit(".", 1)
        targets.add(getattr(importlib.import_module(f"hf_koopman.models.reynet.{module}"), cls))
    assert {ReyNetConfig, ReyNetModel, ReyNetForGraphClassification, ReyNetForEquivariantRegression,
            ReyNetForInvariantRegression} <= targets


# ----------------------------------------------------------------------------------------------------------------------
# the optimised joint-φ layer computes the literal definition (values and gradients); checkpoints keep loading
# ----------------------------------------------------------------------------------------------------------------------
def _literal_reynolds(block, h, pair, node, count):
    """The block's Reynolds part by definition: φ on every materialised 2×2 pair block, masked mean on the diagonal."""
    from hf_koopman.models.reynet import pair_blocks

    c = block.rey_channels
    out = block.phi(pair_blocks(h.permute(0, 3, 1, 2)))  # (B, n, n, 2C')
    diag_part, off_part = out[..., :c], out[..., c:]
    diag = torch.where(pair[..., None], diag_part, 0.0).sum(dim=2) / (count - 1).clamp_min(1).to(h.dtype)[:, None, None]
    return torch.diagonal_scatter(off_part, diag.transpose(1, 2), dim1=1, dim2=2)


def _outputs_and_grads(model, X, mask):
    model.zero_grad(set_to_none=True)
    X = X.clone().requires_grad_(True)
    out = model(X, node_mask=mask).logits
    (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), X.grad, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("act,hidden", [("relu", [7]), ("gelu", [5, 4]), ("relu", [])])
@pytest.mark.parametrize("masked", [False, True])
def test_optimised_joint_layer_equals_literal_definition(act, hidden, masked, monkeypatch):
    """Values and all gradients equal the literal φ-on-every-block computation to 1e-6 relative in float64."""
    from hf_koopman.models.reynet.modeling_reynet import ReyNetReynoldsBlock

    cfg = ReyNetConfig(**{**TINY, "phi_mode": "joint", "hidden_act": act, "phi_hidden_sizes": hidden,
                          "num_reynolds_layers": 2})
    torch.manual_seed(0)
    model = ReyNetForEquivariantRegression(cfg).double()
    with torch.no_grad():  # non-zero biases, so the bias terms of the diagonal sum are exercised
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_()
    X, mask = _batch(n=7)
    mask = mask if masked else None
    fast = _outputs_and_grads(model, X, mask)
    monkeypatch.setattr(ReyNetReynoldsBlock, "reynolds", _literal_reynolds)
    slow = _outputs_and_grads(model, X, mask)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-6, atol=1e-12)
    assert fast[2].keys() == slow[2].keys()
    for k in fast[2]:
        torch.testing.assert_close(fast[2][k], slow[2][k], rtol=1e-6, atol=1e-12, msg=k)


def test_gradient_checkpointing_same_gradients_less_saved_memory():
    model = ReyNetForGraphClassification(ReyNetConfig(**{**TINY, "phi_mode": "joint"})).double().train()
    X, mask = _batch(n=7)
    labels = torch.tensor([0, 1, 2])

    def run():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(X, node_mask=mask, labels=labels).loss
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, sum(saved.values())

    plain, plain_bytes = run()
    assert model.supports_gradient_checkpointing
    model.activation_checkpointing_enable()
    assert all(b.gradient_checkpointing for b in model.reynet.blocks)
    ckpt, ckpt_bytes = run()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-10, atol=1e-12, msg=k)
    assert ckpt_bytes < plain_bytes


def test_committed_graph_checkpoint_keys_and_outputs(monkeypatch):
    """The committed checkpoints load with exactly their stored keys, and the optimised layer reproduces the literal
    computation on them."""
    from pathlib import Path

    from safetensors import safe_open

    from hf_koopman.models.reynet.modeling_reynet import ReyNetReynoldsBlock

    folder = Path(__file__).resolve().parents[3] / "checkpoints" / "reynet-mutag"
    if not folder.is_dir():
        pytest.skip("no committed MUTAG checkpoint")
    model, info = ReyNetForGraphClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    model = model.double().eval()
    X, mask = _batch(n=7)
    X = torch.cat((X, torch.rand(3, model.config.in_channels - 3, 7, 7, dtype=torch.float64)), dim=1)
    fast = model(X, node_mask=mask).logits
    monkeypatch.setattr(ReyNetReynoldsBlock, "reynolds", _literal_reynolds)
    torch.testing.assert_close(fast, model(X, node_mask=mask).logits, rtol=1e-6, atol=1e-12)


def test_class_labels_outside_num_labels_and_fractional_masks_name_the_fix():
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY)).eval()
    X = torch.rand(2, 3, 5, 5)
    with pytest.raises(ValueError, match=r"labels hold class 5 but the model has num_labels=3 classes \(0..2"):
        model(X, labels=torch.tensor([5, 1]))
    assert model(X, labels=torch.tensor([-100, 2])).loss.isfinite()  # -100 ignores a graph
    with pytest.raises(ValueError, match=r"node_mask marks real nodes .* e.g. node_mask > 0.5"):
        model(X, node_mask=torch.full((2, 5), 0.5))
    float_mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    torch.testing.assert_close(model(X, node_mask=float_mask).logits, model(X, node_mask=float_mask > 0).logits)
    with pytest.raises(ValueError, match=r"node_mask marks real nodes .* \(e.g. 0.5 or 2\)"):
        model(X, node_mask=torch.tensor([[1, 1, 2, 0, 0], [1] * 5]))  # an integer mask is read by value too
    int_mask = float_mask.long()
    torch.testing.assert_close(model(X, node_mask=int_mask).logits, model(X, node_mask=float_mask > 0).logits)


def test_non_finite_features_between_real_nodes_are_refused_and_padding_may_hold_anything():
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY)).eval()
    X, mask = torch.rand(2, 3, 5, 5), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    bad = X.clone()
    bad[1, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="graph_tensor contains NaN or inf between real nodes"):
        model(bad, node_mask=mask)
    padded = X.clone()
    padded[1, :, 3:, :] = float("inf")  # rows of padding nodes
    padded[1, :, :, 3:] = float("nan")  # and their columns, also where they meet a real node's row
    torch.testing.assert_close(model(padded, node_mask=mask).logits, model(X, node_mask=mask).logits)


def test_the_label_and_mask_checks_stay_out_of_a_compiled_graph_and_the_meta_device():
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY)).eval()
    X, labels = torch.rand(2, 3, 5, 5), torch.tensor([0, 2])
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # a data-dependent branch would fail here
    torch.testing.assert_close(compiled(X, labels=labels).loss, model(X, labels=labels).loss)
    with torch.device("meta"):
        meta = ReyNetForGraphClassification(ReyNetConfig(**TINY))
    assert meta(X.to("meta"), labels=labels.to("meta")).loss.device.type == "meta"


def test_mean_pooling_averages_the_diagonal_and_off_diagonal_entries_over_real_nodes():
    torch.manual_seed(0)
    model = ReyNetModel(ReyNetConfig(**{**TINY, "pooling": "mean"})).double().eval()
    X, mask = _batch()
    out = model(X, node_mask=mask)
    h = out.last_hidden_state  # (B, F, n, n), zero at padded nodes
    for b, n in enumerate(mask.sum(dim=1).tolist()):
        real = h[b, :, :n, :n]
        diag = real.diagonal(dim1=1, dim2=2).sum(dim=-1) / n
        off = (real.sum(dim=(1, 2)) - real.diagonal(dim1=1, dim2=2).sum(dim=-1)) / (n * (n - 1))
        torch.testing.assert_close(out.pooler_output[b], torch.cat((diag, off)))
    summed = ReyNetModel(ReyNetConfig(**{**TINY, "pooling": "sum"})).double().eval()
    summed.load_state_dict(model.state_dict())
    assert not torch.allclose(summed(X, node_mask=mask).pooler_output, out.pooler_output)


def test_head_dropout_reaches_the_classifier():
    model = ReyNetForGraphClassification(ReyNetConfig(**{**TINY, "head_dropout": 0.3}))
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.3, 0.3]  # before each Linear


def test_float64_inputs_under_autocast_and_lists_are_refused_with_the_fix():
    """Autocast casts float32 inputs, not float64: a float64 graph under CPU autocast is refused with the cast to
    make (it failed in a matmul: Double and BFloat16); a node mask or labels given as lists name torch.as_tensor."""
    torch.manual_seed(0)
    model = ReyNetForGraphClassification(ReyNetConfig(**TINY))
    graph = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"cast the input with"):
        model(graph)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(graph.float())  # float32 under autocast runs, as before
    with pytest.raises(TypeError, match="node_mask must be a torch.Tensor"):
        model(graph.float(), node_mask=[[True] * 5] * 2)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        model(graph.float(), labels=[0, 1])
