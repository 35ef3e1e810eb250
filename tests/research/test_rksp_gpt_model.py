"""The RKSP research transformer: all six normalisations build, train a step, round-trip through Auto classes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

import research.rksp_gpt
from research.rksp_gpt import (  # importing registers rksp_gpt with the Auto classes
    NORM_TYPES,
    RKSPGPTConfig,
    RKSPGPTForCausalLM,
    RKSPGPTForSequenceClassification,
    RKSPGPTModel,
    RKSPViTForImageClassification,
)
from transformers.modeling_layers import GradientCheckpointingLayer


def tiny(norm: str = "pre_ln", **kw) -> RKSPGPTConfig:
    base = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                norm=norm, num_labels=32, image_size=8, patch_size=4)
    base.update(kw)
    return RKSPGPTConfig(**base)


@pytest.mark.parametrize("norm", NORM_TYPES)
def test_every_norm_trains_one_step(norm):
    model = RKSPGPTForSequenceClassification(tiny(norm))
    x = torch.randint(0, 32, (3, 10))
    y = torch.randint(0, 32, (3,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(input_ids=x, labels=y)
    assert out.logits.shape == (3, 32)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed > 0.8 * len(before)


@pytest.mark.parametrize("norm", NORM_TYPES)
def test_vit_and_lm_heads(norm):
    vit = RKSPViTForImageClassification(tiny(norm, num_labels=10))
    out = vit(pixel_values=torch.randn(2, 1, 8, 8), labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 10) and torch.isfinite(out.loss)
    lm = RKSPGPTForCausalLM(tiny(norm))
    ids = torch.randint(0, 32, (2, 12))
    out = lm(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 12, 32) and torch.isfinite(out.loss)


def test_norm_placement_is_what_the_config_says():
    assert all(isinstance(b, GradientCheckpointingLayer) for b in RKSPGPTModel(tiny()).layers)
    none = RKSPGPTModel(tiny("none"))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in none.modules())
    rms = RKSPGPTModel(tiny("rmsnorm"))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rms.modules())
    # DeepNorm scales the residual by (2L)^(1/4) and the branch init by (8L)^(-1/4)
    deep = RKSPGPTModel(tiny("deepnorm", num_hidden_layers=4, initializer_range=0.02))
    assert deep.layers[0].alpha == pytest.approx(8 ** 0.25)
    assert deep.layers[0].mlp.fc_in.weight.std().item() == pytest.approx(0.02 * 32 ** -0.25, rel=0.1)
    # Sub-LN has an extra norm inside each sub-layer
    sub = RKSPGPTModel(tiny("subln"))
    assert isinstance(sub.layers[0].attn.inner_norm, torch.nn.LayerNorm)


def test_causal_lm_is_causal():
    lm = RKSPGPTForCausalLM(tiny()).eval()
    ids = torch.randint(0, 32, (1, 8))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 32
    a, b = lm(input_ids=ids).logits, lm(input_ids=ids2).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="norm="):
        RKSPGPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="divisible"):
        RKSPGPTConfig(hidden_size=10, num_attention_heads=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RKSPGPTModel(tiny())(input_ids=torch.zeros(1, 17, dtype=torch.long))


def test_auto_round_trip(tmp_path):
    config = tiny("post_ln")
    assert type(AutoConfig.for_model("rksp_gpt")) is RKSPGPTConfig
    for auto, cls in (
        (AutoModelForCausalLM, RKSPGPTForCausalLM),
        (AutoModelForSequenceClassification, RKSPGPTForSequenceClassification),
        (AutoModelForImageClassification, RKSPViTForImageClassification),
        (AutoModel, RKSPGPTModel),
    ):
        model = auto.from_config(config)
        assert type(model) is cls
    model = RKSPGPTForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.norm == "post_ln"
    x = torch.randint(0, 32, (2, 10))
    torch.testing.assert_close(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    research.rksp_gpt.register()  # idempotent


def test_kan_b_splines_are_a_partition_of_unity_inside_the_grid():
    from research.rksp_gpt.modeling_rksp_gpt import RKSPKANLinear

    layer = RKSPKANLinear(3, 2, grid_size=5, spline_order=3, grid_range=2.0)
    x = torch.linspace(-1.99, 1.99, 41)[:, None].expand(-1, 3)
    bases = layer.b_splines(x)
    assert bases.shape == (41, 3, 5 + 3)
    assert torch.allclose(bases.sum(-1), torch.ones(41, 3), atol=1e-5)
    assert (bases >= -1e-7).all()
    # outside the extended grid every spline vanishes (only the SiLU base branch remains)
    assert torch.count_nonzero(layer.b_splines(torch.full((1, 3), 10.0))) == 0


def test_kan_mlp_model_trains_and_profiles():
    from hf_koopman import profile
    from research.rksp_gpt.modeling_rksp_gpt import RKSPKANMLP

    model = RKSPGPTForCausalLM(tiny("pre_ln", mlp_type="kan", intermediate_size=24, initializer_range=0.1))
    assert all(isinstance(block.mlp, RKSPKANMLP) for block in model.transformer.layers)
    kan = model.transformer.layers[0].mlp.kan_in
    assert kan.spline_weight.std().item() == pytest.approx(0.1, rel=0.2)  # init std follows initializer_range
    x = torch.randint(0, 32, (4, 16))
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert kan.spline_weight.grad is not None and kan.spline_weight.grad.abs().sum() > 0
    prof = profile(model, {"input_ids": torch.randint(0, 32, (16, 16))}, num_samples=256)
    assert len(prof.layers) == 2


def test_kan_config_validation():
    with pytest.raises(ValueError, match="mlp_type"):
        tiny(mlp_type="moe")
    with pytest.raises(ValueError, match="kan_grid_size"):
        tiny(mlp_type="kan", kan_grid_size=0)
