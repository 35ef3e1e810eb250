"""KSSTrainer at the edges a user reaches: collator batches, model_init, torch.compile (compiled blocks, their
ancestors, accelerate's dynamo backend), compute_loss overrides, the task loss beside the objective, runs and
auto_find_batch_size retries, the last KSS statistics, encoder-decoder masks (sequence classifiers included), PEFT with
checkpointing, arguments."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from conftest import GradCapture, TokenDataset, cpu_training_args, no_norm_gpt2, tiny_gpt2
from transformers import BatchEncoding, HfArgumentParser, Trainer, TrainingArguments

import hf_koopman.profiling as profiling
from hf_koopman.training import KSSConfig, KSSTrainer, KSSTrainingArguments, RKSPCallback


KSS_SMALL = dict(kss_num_samples=256, kss_rank=8)
NO_TERM = "no spectral penalty entered the loss"


def _args(tmp_path, cls=KSSTrainingArguments, **kw):
    """Two logged steps; with `KSSTrainingArguments`, KSS on every step with a small sample."""
    base = {"max_steps": 2}
    if cls is KSSTrainingArguments:
        base.update(kss_every_n_steps=1, **KSS_SMALL)
    return cpu_training_args(tmp_path, cls, **{**base, **kw})


@pytest.fixture
def recorders(monkeypatch):
    """Every `ResidualStreamRecorder` that KSSTrainer.compute_loss creates, in order."""
    made = []

    class Spy(profiling.ResidualStreamRecorder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(profiling, "ResidualStreamRecorder", Spy)
    return made


# ---------------------------------------------------------------------------------------------- BatchEncoding
class RaggedDataset(torch.utils.data.Dataset):
    """Token sequences of lengths 8..32, padded by `pad_collator` as the transformers collators pad them."""

    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 64, (int(8 + 24 * i / max(1, n - 1)),), generator=g) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i]}


def pad_collator(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = f["input_ids"]
        mask[row, : len(f["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return BatchEncoding({"input_ids": ids, "attention_mask": mask, "labels": labels})  # a UserDict, not a dict


def test_batch_encoding_attention_mask_keeps_padding_out(tmp_path, recorders):
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8,
                                               kss_layer_fraction=1.0),
        train_dataset=RaggedDataset(), data_collator=pad_collator,
    )
    trainer.train()
    real = sum(len(item) for item in RaggedDataset().items)
    assert len(recorders) == 1
    assert recorders[0].tokens_seen == {"transformer.h.0": real, "transformer.h.1": real}  # padding excluded
    assert trainer.kss_steps == [0]


def test_peft_prompt_tuning_virtual_tokens_count_and_padding_stays_out(tmp_path, recorders):
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(n_layer=2)
    base.config.n_positions = 40  # room for 8 virtual tokens in front of 32; the position table has 32 + 8 rows
    base.transformer.wpe = torch.nn.Embedding(40, base.config.n_embd)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=8))
    trainer = KSSTrainer(
        model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8, kss_layer_fraction=1.0),
        train_dataset=RaggedDataset(), data_collator=pad_collator,
    )
    trainer.train()
    # the blocks see 8 learned tokens in front of every row: real states of the stream; the padding is not
    real = sum(len(item) for item in RaggedDataset().items) + 8 * len(RaggedDataset())
    assert recorders[0].tokens_seen == {"transformer.h.0": real, "transformer.h.1": real}


# ------------------------------------------------------------------------------------------------- model_init
def test_model_init_rebuilt_model_gets_its_own_blocks(tmp_path):
    trainer = KSSTrainer(model_init=lambda: tiny_gpt2(n_layer=2), args=_args(tmp_path), train_dataset=TokenDataset())
    for _ in range(2):  # train() with model_init builds a new model each time, as hyperparameter_search does
        trainer.train()
        penalties = [h.get("kss/penalty") for h in trainer.state.log_history if "loss" in h]
        assert len(penalties) == 2 and all(p is not None and p > 0 for p in penalties), penalties
        modules = set(map(id, trainer.model.modules()))
        assert all(id(block.module) in modules for block in trainer._kss_blocks)


# ------------------------------------------------------------------------------------- hyperparameter search
def _penalties(trainer):
    return [h.get("kss/penalty") for h in trainer.state.log_history if "loss" in h]


def test_hyperparameter_trial_kss_values_reach_the_penalty(tmp_path, monkeypatch):
    """A trial's `kss_*` values are set on `args` by `Trainer._hp_search_setup`; the KSS term must follow them."""
    import transformers.integrations
    from transformers.trainer_utils import HPSearchBackend

    # no search backend is installed here: a dict trial as in a W&B sweep, with the two things the Trainer asks W&B
    monkeypatch.setattr(transformers.integrations, "hp_params", dict)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=types.SimpleNamespace(id="trial")))
    trainer = KSSTrainer(model_init=lambda: tiny_gpt2(n_layer=2), args=_args(tmp_path, save_strategy="no"),
                         train_dataset=TokenDataset())
    trainer.hp_search_backend = HPSearchBackend.WANDB  # the backend whose trial is a plain dict of values
    trainer.train(trial={"kss_alpha": 0.0})
    assert trainer.args.kss_alpha == 0.0 and trainer.kss_config.alpha == 0.0
    assert trainer.kss_steps == [] and _penalties(trainer) == [None, None]
    trainer.train(trial={"kss_alpha": 0.3, "kss_every_n_steps": 2})
    assert trainer.kss_config.alpha == 0.3 and trainer.kss_config.every_n_steps == 2
    assert trainer.kss_steps == [0]


def test_args_changed_after_init_are_followed_or_named(tmp_path, caplog):
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path), train_dataset=TokenDataset())
    trainer.args.kss_alpha = 0.0
    trainer.train()
    assert trainer.kss_steps == [] and trainer.kss_config.alpha == 0.0
    trainer.kss_config.alpha = 0.2  # a direct edit, args unchanged since the last run: kept
    trainer.train()
    assert trainer.kss_config.alpha == 0.2 and trainer.kss_steps == [0, 1]

    explicit = KSSConfig(alpha=0.15, every_n_steps=1, **{k.removeprefix("kss_"): v for k, v in KSS_SMALL.items()})
    kept = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path / "b"), train_dataset=TokenDataset(),
                      kss_config=explicit)
    kept.args.kss_alpha = 0.0
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        kept.train()
    assert kept.kss_config is explicit and kept.kss_steps == [0, 1]
    assert "explicit kss_config, which it keeps" in caplog.text


# ---------------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_is_refused_before_any_training(tmp_path):
    with pytest.raises(ValueError, match=r"torch_compile=True.*forward hooks.*torch_compile=False.*kss_enabled=False"):
        KSSTrainer(model=tiny_gpt2(n_layer=2), train_dataset=TokenDataset(),
                   args=_args(tmp_path, torch_compile=True, torch_compile_backend="eager"))
    with pytest.raises(ValueError, match=r"compiled with torch.compile \(the model itself\)"):
        KSSTrainer(model=torch.compile(tiny_gpt2(n_layer=2)), args=_args(tmp_path), train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="compiled with torch.compile"):
        KSSTrainer(model_init=lambda: torch.compile(tiny_gpt2(n_layer=2)), args=_args(tmp_path),
                   train_dataset=TokenDataset())
    # KSS off: compiling is the user's business
    KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path, torch_compile=True, torch_compile_backend="eager",
                                                      kss_enabled=False), train_dataset=TokenDataset())

    # switched on after construction: train() refuses before the first step, also for a model built by model_init
    compiled = KSSTrainer(model=tiny_gpt2(n_layer=2), train_dataset=TokenDataset(),
                          args=_args(tmp_path, torch_compile=True, torch_compile_backend="eager", kss_enabled=False))
    built = KSSTrainer(model_init=lambda: torch.compile(tiny_gpt2(n_layer=2)), train_dataset=TokenDataset(),
                       args=_args(tmp_path, kss_enabled=False))
    for trainer in (compiled, built):
        trainer.kss_config.enabled = True
        with pytest.raises(ValueError, match="KSS cannot run with"):
            trainer.train()
        assert trainer.state.global_step == 0 and trainer.kss_steps == []


def _compile_in_place(module):
    """`module.compile()` as it leaves the module: `_compiled_call_impl` set, no compilation until a call."""
    module.compile(backend="eager")
    assert module._compiled_call_impl is not None
    return module


@pytest.mark.parametrize("where", ["model", "transformer", "block", "block-wrapper"])
def test_compiled_blocks_or_their_ancestors_are_refused(tmp_path, where):
    model = tiny_gpt2(n_layer=2)
    if where == "model":
        _compile_in_place(model)
        expected = "the model itself"
    elif where == "transformer":
        _compile_in_place(model.transformer)
        expected = "module 'transformer'"
    elif where == "block":
        _compile_in_place(model.transformer.h[1])
        expected = "module 'transformer.h.1'"
    else:  # a block list whose items are torch.compile wrappers (regional compilation)
        model.transformer.h[1] = torch.compile(model.transformer.h[1], backend="eager")
        expected = "module 'transformer.h.1'"
    with pytest.raises(ValueError, match=rf"compiled with torch.compile \({expected}.*skip_nnmodule_hook_guards"):
        KSSTrainer(model=model, args=_args(tmp_path), train_dataset=TokenDataset())
    # the same model with KSS switched on after construction: refused when the run starts, before any step
    trainer = KSSTrainer(model=model, args=_args(tmp_path, kss_enabled=False), train_dataset=TokenDataset())
    trainer.kss_config.enabled = True
    with pytest.raises(ValueError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0


def test_one_compiled_block_of_a_second_stack_is_refused(tmp_path):
    # discovery keeps the encoder's list and drops the decoder's mixed list; KSS would hook the encoder alone
    from transformers import BartConfig, BartForConditionalGeneration

    model = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    model.model.decoder.layers[1] = torch.compile(model.model.decoder.layers[1], backend="eager")
    with pytest.raises(ValueError, match=r"compiled with torch.compile \(module 'model.decoder.layers.1'"):
        KSSTrainer(model=model, args=_args(tmp_path), train_dataset=TokenDataset())


def test_compiled_items_of_lists_inside_or_beside_the_blocks_are_not_listed():
    # an expert list inside a block, a head built as a Sequential, a stack kss_layers leaves out
    from transformers import BartConfig, BartForConditionalGeneration

    from hf_koopman.training.trainer import _compiled_hook_paths

    model = tiny_gpt2(n_layer=2)
    model.transformer.h[0].mlp.experts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    model.transformer.h[0].mlp.experts[0] = torch.compile(model.transformer.h[0].mlp.experts[0], backend="eager")
    model.lm_head = torch.nn.Sequential(torch.compile(model.lm_head, backend="eager"))
    assert _compiled_hook_paths(model) == []
    model.transformer.h[1] = torch.compile(model.transformer.h[1], backend="eager")  # a block itself: listed
    assert _compiled_hook_paths(model) == ["transformer.h.1"]
    assert type(model.transformer.h[1]).__name__ == "OptimizedModule"  # the wrapper is back in its list
    # kss_layers resolves on the model as it is, as KSS resolves it: as module objects or paths into the wrapper
    assert _compiled_hook_paths(model, list(model.transformer.h)) == ["transformer.h.1"]
    assert _compiled_hook_paths(model, ["transformer.h.0", "transformer.h.1._orig_mod"]) == ["transformer.h.1"]
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))
    bart.model.decoder.layers[1] = torch.compile(bart.model.decoder.layers[1], backend="eager")
    assert _compiled_hook_paths(bart) == ["model.decoder.layers.1"]
    assert _compiled_hook_paths(bart, "model.encoder.layers") == []  # KSS hooks the encoder only


def test_a_refused_train_sets_nothing_up(tmp_path):
    # refused before Trainer.train() runs: no NEFTune hook on the embedding, the trainer not marked as training
    model = tiny_gpt2(n_layer=2)
    _compile_in_place(model.transformer.h[1])
    # KSS switched on in the trainer's config, or through args
    for switch_on in (lambda t: setattr(t.kss_config, "enabled", True), lambda t: setattr(t.args, "kss_enabled", True)):
        trainer = KSSTrainer(model=model, args=_args(tmp_path, kss_enabled=False, neftune_noise_alpha=5.0),
                             train_dataset=TokenDataset())
        switch_on(trainer)
        with pytest.raises(ValueError, match="KSS cannot run with"):
            trainer.train()
        assert not trainer.is_in_train
        assert not model.get_input_embeddings()._forward_hooks


def test_compiled_modules_inside_or_outside_the_blocks_are_allowed(tmp_path):
    # the hooked block calls stay eager, so KSS records what it records uncompiled (same penalties)
    reference = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path / "eager"), train_dataset=TokenDataset())
    reference.train()
    expected = [h["kss/penalty"] for h in reference.state.log_history if "loss" in h]
    model = tiny_gpt2(n_layer=2)
    model.lm_head = torch.compile(model.lm_head, backend="eager")
    for block in model.transformer.h:
        _compile_in_place(block.mlp)
    trainer = KSSTrainer(model=model, args=_args(tmp_path / "compiled"), train_dataset=TokenDataset())
    trainer.train()
    assert trainer.kss_steps == [0, 1]
    penalties = [h["kss/penalty"] for h in trainer.state.log_history if "loss" in h]
    assert penalties == pytest.approx(expected, rel=1e-5)


@pytest.fixture
def dynamo_backend(monkeypatch):
    """`ACCELERATE_DYNAMO_BACKEND=EAGER`, as `accelerate launch --dynamo_backend eager` sets it; the accelerator state
    it leaves behind is reset afterwards."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    yield
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_dynamo_backend_is_refused(tmp_path, dynamo_backend):
    with pytest.raises(ValueError, match=r"accelerate's dynamo backend 'eager' \(accelerate's process-wide "
                                         r"AcceleratorState.*another Trainer or Accelerator.*kss_enabled=False"):
        KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path), train_dataset=TokenDataset())
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path, kss_enabled=False),
                         train_dataset=TokenDataset())
    assert trainer.accelerator.state.dynamo_plugin.backend.value == "EAGER"  # the plugin the run would compile with
    trainer.kss_config.enabled = True
    with pytest.raises(ValueError, match="dynamo backend 'eager'"):
        trainer.train()
    assert trainer.state.global_step == 0


# ----------------------------------------------------------------------------------- KSS step without a penalty
class OwnComputeLoss(KSSTrainer):
    """The common override that calls the model itself instead of super().compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def _no_term_warnings(caplog):
    return [r for r in caplog.records if NO_TERM in r.getMessage()]


def test_compute_loss_override_without_super_warns_once_per_train(tmp_path, caplog):
    trainer = OwnComputeLoss(model=tiny_gpt2(n_layer=2), args=_args(tmp_path, max_steps=3),
                             train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    warnings = _no_term_warnings(caplog)
    assert len(warnings) == 1  # three KSS steps, one warning
    text = warnings[0].getMessage()
    assert "optimizer step 0" in text and "compute_loss did not run" in text and "super().compute_loss(" in text
    assert "kss_enabled=False" in text
    assert trainer.kss_steps == []  # no KSS term entered the loss: not listed as a KSS step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["kss/task_loss"] == h["loss"] for h in logs)  # no term in the loss: the task loss is the loss
    assert not any(k.startswith("kss/") and k != "kss/task_loss" for h in trainer.state.log_history for k in h)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()  # a new train(): warned again
    assert len(_no_term_warnings(caplog)) == 1


def test_blocks_the_forward_does_not_run_warn_and_are_not_kss_steps(tmp_path, caplog):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    model = tiny_gpt2(n_layer=2)
    model.unused = torch.nn.ModuleList([GPT2Block(model.config, layer_idx=0)])  # e.g. a tower this batch skips
    trainer = KSSTrainer(model=model, args=_args(tmp_path, kss_layers="unused"), train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    warnings = _no_term_warnings(caplog)
    assert len(warnings) == 1
    assert "unused.0" in warnings[0].getMessage() and "captured no token states" in warnings[0].getMessage()
    assert "kss_layers" in warnings[0].getMessage()
    assert trainer.kss_steps == []
    assert not any("kss/penalty" in h for h in trainer.state.log_history)


def test_a_kss_step_with_a_penalty_does_not_warn(tmp_path, caplog):
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path), train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    assert not _no_term_warnings(caplog) and trainer.kss_steps == [0, 1]


# ------------------------------------------------------------------------------------------------ auto_kss
def _train_no_norm(tmp_path, caplog, callback, **kw) -> KSSTrainer:
    """A KSSTrainer run of the high-risk No-Norm GPT-2 with `callback`, warnings captured."""
    trainer = KSSTrainer(
        model=no_norm_gpt2(), train_dataset=TokenDataset(), callbacks=[callback],
        args=_args(tmp_path, kss_every_n_steps=2, kss_num_samples=128, **kw),
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    return trainer


def test_auto_kss_follows_an_in_range_probability(tmp_path, caplog, in_range_estimator):
    in_range_estimator(0.002)  # every input inside the fitted range, a low probability at the run's learning rate
    callback = RKSPCallback(auto_kss=True, num_samples=128, save_artifacts=False)
    _train_no_norm(tmp_path, caplog, callback, kss_enabled=True, max_steps=1)
    assert callback.init_verdict == "high risk"
    assert "lower the learning rate" not in caplog.text  # the in-range probability says no lower rate is needed


@pytest.mark.parametrize("enabled", [True, False], ids=["kss-on", "kss-off"])
def test_auto_kss_message_says_the_state_kss_is_in(tmp_path, caplog, enabled):
    callback = RKSPCallback(auto_kss=True, num_samples=128, save_artifacts=False)
    state = callback.state()
    if not enabled:  # a saved state that carries the key `kss_auto_enabled` loads; the key changes nothing
        state["attributes"]["kss_auto_enabled"] = True
        callback = RKSPCallback.from_state(state)
    trainer = _train_no_norm(tmp_path, caplog, callback, kss_enabled=enabled, max_steps=3)
    assert callback.init_verdict == "high risk"
    assert "results/kss_v2.md" in caplog.text
    if enabled:
        assert "KSS is on because kss_enabled=True (alpha=0.15)" in caplog.text
        assert "stays off" not in caplog.text
        assert trainer.kss_steps == [0, 2]
    else:
        assert "KSS is off (kss_enabled=False) and stays off despite the high-risk verdict" in caplog.text
        assert trainer.kss_steps == [] and not trainer.kss_config.enabled
    assert any(h.get("kss/auto_enabled") == 0.0 for h in trainer.state.log_history)
    assert "kss_auto_enabled" not in callback.state()["attributes"]


# ------------------------------------------------------------------------------------------- kss/task_loss
def test_task_loss_is_the_logged_loss_without_the_penalty_and_matches_a_plain_trainer(tmp_path):
    alpha = 0.5
    kss = KSSTrainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path / "kss", kss_alpha=alpha),
                     train_dataset=TokenDataset())
    kss.train()
    logs = [h for h in kss.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["kss/task_loss"] < entry["loss"]
        assert entry["kss/task_loss"] + alpha * entry["kss/penalty"] == pytest.approx(entry["loss"], rel=1e-6)
    plain = Trainer(model=tiny_gpt2(n_layer=2), args=_args(tmp_path / "plain", TrainingArguments, max_steps=1),
                    train_dataset=TokenDataset())
    plain.train()
    first = plain.state.log_history[0]["loss"]
    assert logs[0]["kss/task_loss"] == pytest.approx(first, rel=1e-6)  # same weights, same batch, no penalty


@pytest.mark.parametrize("scaled", [None, False], ids=["loss-scaled-for-ga", "trainer-divides"])
def test_task_loss_is_averaged_like_loss_over_steps_and_accumulation(tmp_path, scaled):
    # window of two optimizer steps (one with KSS), two micro-batches each: the term's share of the logged loss is
    # alpha * penalty / 2, whoever divides by the accumulation steps
    alpha = 0.5
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2), train_dataset=TokenDataset(n=32),
        args=_args(tmp_path, kss_alpha=alpha, max_steps=4, logging_steps=2, kss_every_n_steps=2,
                   gradient_accumulation_steps=2, per_device_train_batch_size=2),
    )
    trainer.loss_is_scaled_for_ga = scaled
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for entry in logs:
        share = entry["loss"] - entry["kss/task_loss"]
        assert share == pytest.approx(alpha * entry["kss/penalty"] / 2, rel=1e-5)


def test_every_training_log_has_the_task_loss_and_each_train_starts_a_new_kss_steps(tmp_path):
    trainer = KSSTrainer(model=tiny_gpt2(n_layer=2), train_dataset=TokenDataset(n=32),
                         args=_args(tmp_path, max_steps=4, logging_steps=1, kss_every_n_steps=2))
    for _ in range(2):
        trainer.train()
        assert trainer.kss_steps == [0, 2]  # this run's KSS steps only
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for entry in logs:
        if "kss/penalty" in entry:  # windows with a KSS step: the loss without the term
            assert entry["kss/task_loss"] < entry["loss"]
        else:  # no KSS term in the window: the task loss is the logged loss
            assert entry["kss/task_loss"] == entry["loss"]
    assert [("kss/penalty" in h) for h in logs] == [True, False, True, False]


class FirstAttemptRunsOutOfMemory(KSSTrainer):
    """`auto_find_batch_size`: the first attempt fails at its fourth micro-batch, after two KSS micro-batches of step 0
    and one of step 1, and `train()` reruns the loop at a smaller batch size. `records` keeps, per micro-batch, the
    batch size, the step, the returned loss and the KSS term's share of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.records = 0, []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("CUDA out of memory. (simulated)")
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        term = self._kss_micro_term
        assert self._loss_counts_as_ga_scaled(num_items_in_batch)  # the share is the term itself
        share = 0.0 if term is None else float(term)
        self.records.append((inputs["input_ids"].shape[0], self.state.global_step, float(loss), share))
        return loss


def test_a_retry_at_a_smaller_batch_size_starts_with_fresh_kss_state(tmp_path):
    trainer = FirstAttemptRunsOutOfMemory(
        model=tiny_gpt2(n_layer=2), train_dataset=TokenDataset(n=64),
        args=_args(tmp_path, max_steps=4, logging_steps=2, kss_alpha=0.5, gradient_accumulation_steps=2,
                   per_device_train_batch_size=4, auto_find_batch_size=True),
    )
    trainer.train()
    retry = [r for r in trainer.records if r[0] != 4]
    assert len(trainer.records) - len(retry) == 3 and len(retry) == 8  # the retry ran at batch size 3, 4 steps x 2
    assert trainer.kss_steps == [0, 1, 2, 3]  # the failed attempt's steps 0 and 1 are not listed
    for end in (2, 4):
        window = [r for r in retry if end - 2 <= r[1] < end]
        log = next(h for h in trainer.state.log_history if h.get("step") == end and "loss" in h)
        assert log["loss"] == pytest.approx(sum(r[2] for r in window) / 2, rel=1e-5)
        assert log["kss/task_loss"] == pytest.approx(sum(r[2] - r[3] for r in window) / 2, rel=1e-5)
        assert log["kss/penalty"] == pytest.approx(sum(r[3] for r in window) / len(window) / 0.5 * 2, rel=1e-5)


# --------------------------------------------------------------------------------- statistics after the last log
def test_kss_statistics_after_the_last_training_log_reach_the_final_log(tmp_path):
    trainer = KSSTrainer(
        model=tiny_gpt2(n_layer=2), train_dataset=TokenDataset(n=32),
        args=_args(tmp_path, max_steps=5, logging_steps=4, kss_every_n_steps=4),
    )
    output = trainer.train()
    assert trainer.kss_steps == [0, 4]
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary and summary["kss/penalty"] > 0 and 0 <= summary["kss/near_unit_mass"] <= 1
    assert "kss/grad_scale" in summary and "kss/task_loss" not in summary
    step4 = [h for h in trainer.state.log_history if h.get("step") == 4 and "loss" in h][0]
    assert summary["kss/penalty"] != step4["kss/penalty"]  # step 4's own statistics, not the earlier window's
    assert output.metrics["kss/penalty"] == summary["kss/penalty"]
    assert trainer._kss_stats is None


# ---------------------------------------------------------------------------------- encoder-decoder masks
def test_encoder_decoder_masks_keep_padded_decoder_positions_out(tmp_path, caplog, recorders):
    from datasets import Dataset
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (8, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(5, 64, (8, 6), generator=g)
    labels[::2, 4:] = -100  # padded labels, no decoder_attention_mask: as DataCollatorForSeq2Seq pads them
    train = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
    trainer = KSSTrainer(model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8,
                                                 kss_layer_fraction=1.0), train_dataset=train)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "does not match the token grid" not in caplog.text
    seen = recorders[0].tokens_seen
    assert seen["encoder.block.0"] == seen["encoder.block.1"] == int(mask.sum())
    assert seen["decoder.block.0"] == seen["decoder.block.1"] == int((labels != -100).sum())
    assert trainer.kss_steps == [0]


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification"])
def test_sequence_classifier_decoder_uses_the_attention_mask(tmp_path, caplog, recorders, problem):
    # BartForSequenceClassification feeds its decoder the shifted input_ids: its padding is attention_mask's, and its
    # labels, (batch,) classes or (batch, 3) float targets, are not token labels
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    model = BartForSequenceClassification(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=3, problem_type=problem,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, max_position_embeddings=64))
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        n = 6 + 2 * i
        ids = torch.full((24,), 1)
        ids[:n] = torch.randint(3, 64, (n,), generator=g)
        ids[n - 1] = 2  # one eos per row, as the classifier requires
        label = torch.tensor(i % 3) if problem == "single_label_classification" else torch.tensor([i % 2, 1.0, 0.0])
        rows.append({"input_ids": ids, "attention_mask": (ids != 1).long(), "labels": label})
    trainer = KSSTrainer(model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8,
                                                 kss_layer_fraction=1.0), train_dataset=rows)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "does not match the token grid" not in caplog.text
    real = sum(int(row["attention_mask"].sum()) for row in rows)  # 104 of the 8 x 24 positions
    assert recorders[0].tokens_seen == {f"model.{stack}.layers.{i}": real for stack in ("encoder", "decoder")
                                        for i in range(2)}
    assert trainer.kss_steps == [0]


def test_snapshot_masks_per_stack():
    from transformers import T5Config, T5ForConditionalGeneration

    from hf_koopman.profiling import find_residual_blocks
    from hf_koopman.training.trainer import _snapshot_masks

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_decoder_layers=1, num_heads=4))
    enc, labels = torch.ones(2, 5, dtype=torch.long), torch.tensor([[3, 4, -100], [3, -100, -100]])
    both = find_residual_blocks(model)
    masks = _snapshot_masks(model, both, {"input_ids": enc, "attention_mask": enc, "labels": labels})
    assert masks["encoder"] is enc and torch.equal(masks["decoder"], labels != -100)
    dec = torch.ones(2, 3, dtype=torch.long)
    masks = _snapshot_masks(model, both, {"attention_mask": enc, "decoder_attention_mask": dec, "labels": labels})
    assert masks["decoder"] is dec  # an explicit decoder mask wins over the labels
    # no labels on the decoder grid: the encoder mask, which the recorder applies where it fits the decoder grid
    assert _snapshot_masks(model, both, {"attention_mask": enc})["decoder"] is enc
    assert _snapshot_masks(model, both, {"attention_mask": enc, "labels": torch.tensor([1, 0])})["decoder"] is enc
    assert _snapshot_masks(model, both, {"attention_mask": enc, "labels": torch.rand(2, 3)})["decoder"] is enc
    # decoder_input_ids fix the grid: labels of that shape give the mask; others, and a mask of another shape, do not
    dec_ids = torch.ones(2, 3, dtype=torch.long)
    masks = _snapshot_masks(model, both, {"attention_mask": enc, "decoder_input_ids": dec_ids, "labels": labels})
    assert torch.equal(masks["decoder"], labels != -100)
    masks = _snapshot_masks(model, both, {"attention_mask": enc, "decoder_input_ids": dec_ids[:, :2], "labels": labels})
    assert masks["decoder"] is None  # every decoder position
    # decoder_input_ids without a decoder mask or token labels: every decoder position (the encoder's padding says
    # nothing about the decoder's), also when the two grids have one shape
    classes = {"attention_mask": enc, "decoder_input_ids": torch.ones(2, 5, dtype=torch.long), "labels": labels[:, 0]}
    assert _snapshot_masks(model, both, classes)["decoder"] is None
    # class labels (batch, 1), which the classification losses accept, are not a one-token decoder grid
    assert _snapshot_masks(model, both, {"attention_mask": enc, "labels": torch.tensor([[1], [0]])})["decoder"] is enc
    decoder_only = find_residual_blocks(model, layers="decoder.block")  # one list: its label is not "decoder"
    masks = _snapshot_masks(model, decoder_only, {"attention_mask": enc, "labels": labels})
    assert torch.equal(masks[decoder_only[0].stack], labels != -100)
    gpt = tiny_gpt2(n_layer=1)
    assert _snapshot_masks(gpt, find_residual_blocks(gpt), BatchEncoding({"attention_mask": enc}))[""] is enc
    # a dual encoder: the text mask reaches the text tower only, as in profile()
    import transformers

    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), projection_dim=8))
    masks = _snapshot_masks(clip, find_residual_blocks(clip), {"attention_mask": enc})
    assert masks["text_model.encoder.layers"] is enc and masks["vision_model.encoder.layers"] is None
    assert _snapshot_masks(gpt, find_residual_blocks(gpt), (enc,)) is None


def _tiny_blip(cls):
    import transformers

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return cls(transformers.BlipConfig(text_config=dict(**tower, vocab_size=64),
                                       vision_config=dict(**tower, image_size=8, patch_size=4)))


def test_snapshot_masks_route_blip_decoders_by_what_they_read():
    """BLIP is not encoder-decoder: the captioning decoder reads `input_ids` and takes `attention_mask`; the question
    answering decoder, fed `decoder_input_ids`, takes `decoder_attention_mask`; the vision tower takes no mask."""
    import transformers

    from hf_koopman.profiling import find_residual_blocks
    from hf_koopman.training.trainer import _snapshot_masks

    mask, decoder_mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    captioner = _tiny_blip(transformers.BlipForConditionalGeneration)
    blocks = find_residual_blocks(captioner)
    masks = _snapshot_masks(captioner, blocks, {"attention_mask": mask, "labels": mask})
    assert {b.name: masks[b.stack] for b in blocks} == {"vision_model.encoder.layers.0": None,
                                                        "text_decoder.bert.encoder.layer.0": mask}
    answerer = _tiny_blip(transformers.BlipForQuestionAnswering)
    blocks = find_residual_blocks(answerer)
    batch = {"attention_mask": mask, "decoder_input_ids": decoder_mask, "decoder_attention_mask": decoder_mask}
    masks = _snapshot_masks(answerer, blocks, batch)
    assert {b.name: masks[b.stack] for b in blocks} == {"vision_model.encoder.layers.0": None,
                                                        "text_encoder.encoder.layer.0": mask,
                                                        "text_decoder.bert.encoder.layer.0": decoder_mask}
    # without decoder_attention_mask, the padding of the labels, as profile() reads it
    labels = torch.tensor([[5, 6, -100], [5, -100, -100]])
    masks = _snapshot_masks(answerer, blocks, {"attention_mask": mask, "decoder_input_ids": decoder_mask,
                                               "labels": labels})
    assert torch.equal(masks[blocks[-1].stack], labels != -100)


def test_snapshot_masks_unwrap_a_peft_model():
    """KSSTrainer passes `accelerator.unwrap_model(model)`, still a `PeftModel`: the text mask reaches FLAVA's text
    tower only, as for the bare model."""
    import transformers

    from hf_koopman.profiling import find_residual_blocks
    from hf_koopman.training.trainer import _snapshot_masks

    peft = pytest.importorskip("peft")
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    flava = transformers.FlavaModel(transformers.FlavaConfig(
        text_config=dict(**tower, vocab_size=64), image_config=dict(**tower, image_size=8, patch_size=4),
        multimodal_config=tower))
    wrapped = peft.get_peft_model(flava, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    enc = torch.ones(2, 5, dtype=torch.long)
    masks = _snapshot_masks(wrapped, find_residual_blocks(wrapped), {"attention_mask": enc})
    assert masks["text_model.encoder.layer"] is enc
    assert masks["image_model.encoder.layer"] is None and masks["multimodal_model.encoder.layer"] is None


# ---------------------------------------------------------------------- activation cap: sources with nothing below
def test_reaches_parameter_follows_the_autograd_graph():
    from torch.utils.checkpoint import checkpoint

    from hf_koopman.training.trainer import _reaches_parameter

    weight = torch.nn.Parameter(torch.randn(3, 3))
    frozen = torch.randn(3, 3)
    leaf = torch.randn(2, 3).requires_grad_(True)  # an input marked as requiring grad, no parameter below
    memo = {}
    assert _reaches_parameter(weight, memo)
    assert _reaches_parameter(leaf @ weight, memo)
    assert not _reaches_parameter(leaf, memo)
    assert not _reaches_parameter(leaf @ frozen + 1.0, memo)
    # a custom autograd.Function (reentrant checkpointing) may hold parameters the graph does not show
    hidden = checkpoint(lambda x: x @ weight, leaf, use_reentrant=True)
    assert _reaches_parameter(hidden, memo)


def test_activation_cap_warning_names_the_missing_trainable_parameter(tmp_path, caplog):
    # only the head trains; the inputs are marked as requiring grad (as PEFT and checkpointing mark them), so every
    # captured activation requires grad, but none has a trainable parameter below it
    model = tiny_gpt2(n_layer=2, tie_word_embeddings=False)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("lm_head"))
    model.enable_input_require_grads()
    trainer = KSSTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=TokenDataset())
    with caplog.at_level(logging.WARNING, logger="hf_koopman.training.trainer"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records if "grad_cap='activations'" in r.getMessage()]
    assert len(messages) == 1
    assert "no captured activation has a trainable parameter below it" in messages[0]
    assert "kss_enabled=False" in messages[0]
    assert "kss/penalty" in trainer.state.log_history[0] and "kss/grad_scale" not in trainer.state.log_history[0]


@pytest.mark.parametrize("model_kind", ["gpt2", "llama"])
def test_activation_cap_is_the_same_with_and_without_gradient_checkpointing_under_lora(tmp_path, model_kind):
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM

    def build():
        if model_kind == "gpt2":  # block 0's input is the sum of the (marked) token and position embeddings
            return peft.get_peft_model(tiny_gpt2(n_layer=2), peft.LoraConfig(
                r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
        torch.manual_seed(0)  # block 0's input is the marked embedding output itself
        config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
        return peft.get_peft_model(AutoModelForCausalLM.from_config(config), peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))

    def run(sub, **kw):
        capture = GradCapture()
        trainer = KSSTrainer(model=build(), train_dataset=TokenDataset(), callbacks=[capture],
                             args=_args(tmp_path / sub, max_steps=1, max_grad_norm=0.0, kss_layer_fraction=1.0,
                                        kss_alpha=20.0, **kw))
        trainer.train()
        return trainer.state.log_history[0]["kss/grad_scale"], capture.grads

    scale, grads = run("plain")
    assert 0.0 < scale < 1.0  # the cap binds
    for reentrant in (False, True):
        gc_scale, gc_grads = run(f"gc-{reentrant}", gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert gc_scale == pytest.approx(scale, rel=1e-6), (reentrant, gc_scale, scale)
        for name, g in grads.items():
            torch.testing.assert_close(gc_grads[name], g, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kss_power_iters", 1.5, "kss_power_iters must be an int >= 0, got 1.5"),
        ("kss_oversample", 2.0, "kss_oversample must be an int >= 0, got 2.0"),
        ("kss_tau_l", -5.0, r"kss_tau_l is the lower edge of the near-unit band .* must lie in \[0, 1\], got -5.0"),
        ("kss_enabled", "no", "kss_enabled must be True or False, got 'no'"),
        ("kss_power_iters", None, "kss_power_iters must be an int >= 0, got None"),
        ("kss_oversample", "3", "kss_oversample must be an int >= 0, got '3'"),
        ("kss_oversample", -1, "kss_oversample and kss_power_iters must be >= 0"),
    ],
)
def test_invalid_kss_arguments_are_named(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=f"^KSSTrainingArguments: {message}"):
        KSSTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **{field: value})
    with pytest.raises(ValueError, match=f"^KSSConfig: {message.replace('kss_', '')}"):
        KSSConfig(**{field.removeprefix("kss_"): value})


def test_kss_arguments_from_the_command_line(tmp_path):
    parser = HfArgumentParser(KSSTrainingArguments)
    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(base + ["--kss_enabled", "no", "--kss_max_grad_ratio", "0",
                                                         "--kss_power_iters", "0", "--kss_tau_l", "0"])
    config = args.kss_config()
    assert config.enabled is False and config.max_grad_ratio == 0.0 and config.power_iters == 0
    assert config.tau_l == 0.0
    with pytest.raises(ValueError, match=r"kss_tau_l .* must lie in \[0, 1\], got -5.0"):
        parser.parse_args_into_dataclasses(base + ["--kss_tau_l", "-5"])
    with pytest.raises(SystemExit):  # argparse's own int check
        parser.parse_args_into_dataclasses(base + ["--kss_power_iters", "1.5"])
    # the help names what the command line accepts: 0 disables the cap ("None" is not a number argparse takes)
    ratio = next(a for a in parser._actions if "--kss_max_grad_ratio" in a.option_strings)
    assert "0 disables the cap" in ratio.help
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(base + ["--kss_max_grad_ratio", "None"])


def test_numpy_bools_switch_kss(tmp_path):
    np = pytest.importorskip("numpy")
    for value in (True, False):
        config = KSSConfig(enabled=np.bool_(value))
        assert config.enabled is value and config.active is value
        args = KSSTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", kss_enabled=np.bool_(value))
        assert args.kss_config().enabled is value and args.kss_enabled is value
        assert f'"kss_enabled": {str(value).lower()}' in args.to_json_string()  # what the loggers write


@pytest.mark.parametrize("seed", [None, "1", 1.5, True])
def test_kss_seed_must_be_an_int(tmp_path, seed):
    with pytest.raises(ValueError, match=f"^KSSTrainingArguments: kss_seed must be an int, got {seed!r}"):
        KSSTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", kss_seed=seed)


def test_numpy_numbers_become_python_numbers_on_the_arguments(tmp_path):
    np = pytest.importorskip("numpy")
    args = KSSTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", kss_seed=np.int64(3),
                                kss_every_n_steps=np.int64(5), kss_layer_fraction=np.float32(0.5))
    assert type(args.kss_seed) is int and args.kss_config().seed == 3 and type(args.kss_every_n_steps) is int
    assert type(args.kss_layer_fraction) is float
    assert '"kss_seed": 3' in args.to_json_string()  # what the loggers write


def test_numpy_integers_are_counts_and_bools_are_not(tmp_path):
    np = pytest.importorskip("numpy")
    config = KSSConfig(every_n_steps=np.int64(5), num_samples=np.int32(64), rank=np.int64(4), oversample=np.int8(2))
    assert (config.every_n_steps, config.num_samples, config.rank, config.oversample) == (5, 64, 4, 2)
    assert all(type(v) is int for v in (config.every_n_steps, config.num_samples, config.rank, config.oversample))
    for name in ("every_n_steps", "num_samples", "rank"):
        with pytest.raises(ValueError, match=f"{name} must be .*an int >= ., got True"):
            KSSConfig(**{name: True})


class _NoBlocks(torch.nn.Module):
    """A language model without residual blocks: embedding, a plain MLP, head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
        self.head = torch.nn.Linear(16, 64)

    def forward(self, input_ids, labels=None, attention_mask=None):
        logits = self.head(self.mlp(self.emb(input_ids)))
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_a_model_without_findable_blocks_is_refused_before_training_naming_kss_layers(tmp_path):
    """KSS needs the residual blocks: a run on a model without findable ones is refused before its first step, with
    the fix (kss_layers); evaluation, which runs no KSS, and a run with KSS off still work."""
    args = cpu_training_args(tmp_path, KSSTrainingArguments, max_steps=2, kss_every_n_steps=1)
    trainer = KSSTrainer(model=_NoBlocks(), args=args, train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=4))
    assert "eval_loss" in trainer.evaluate()
    with pytest.raises(ValueError, match=r"kss_layers") as err:
        trainer.train()
    assert err.value.args[0].startswith("KSSTrainer: KSS cannot find the residual blocks")
    assert trainer.state.global_step == 0 and trainer.kss_steps == []
    bad_path = cpu_training_args(tmp_path, KSSTrainingArguments, max_steps=2, kss_layers="model.layers")
    with pytest.raises(ValueError, match=r"not a sub-module"):
        KSSTrainer(model=tiny_gpt2(), args=bad_path, train_dataset=TokenDataset()).train()
    off = cpu_training_args(tmp_path, KSSTrainingArguments, max_steps=1, kss_enabled=False)
    KSSTrainer(model=_NoBlocks(), args=off, train_dataset=TokenDataset()).train()


def test_a_kss_rank_covering_every_mode_says_it_is_the_full_spectrum(tmp_path, caplog):
    from conftest import info_logs

    args = cpu_training_args(tmp_path, KSSTrainingArguments, max_steps=2, kss_every_n_steps=1, kss_rank=10_000,
                             kss_num_samples=64)
    with info_logs(caplog):
        KSSTrainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset()).train()
    assert caplog.text.count("kss_rank=10000 >= min(N, d) = 32: every mode is computed") == 1
