"""RKSPCallback: init profile through Trainer.log, artefacts, monitoring, divergence guard, resume, auto-KSS, Seq2Seq."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import TokenDataset, cpu_training_args, no_norm_gpt2, tiny_gpt2
from transformers import Trainer, TrainingArguments

import hf_koopman.training.callback as callback_module
from hf_koopman.training import KSSTrainer, KSSTrainingArguments, RKSPCallback


SMALL = dict(num_samples=128)  # full spectrum: a rank-r profile gets no threshold verdict


def _args(tmp_path, cls=TrainingArguments, **kw):
    small = dict(kss_num_samples=128, kss_rank=8) if cls is KSSTrainingArguments else {}
    return cpu_training_args(tmp_path, cls, **{"max_steps": 4, "lr_scheduler_type": "constant", **small, **kw})


def _loss_steps(trainer):
    return [h["step"] for h in trainer.state.log_history if "loss" in h]


def test_init_profile_reaches_log_history_and_output_dir(tmp_path, caplog):
    plain = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "plain"), train_dataset=TokenDataset())
    plain.train()
    callback = RKSPCallback(every_n_steps=2, **SMALL)
    profiles = []  # every profile the callback takes, in order: init, step 2, step 4
    run_profile = callback._run_profile
    callback._run_profile = lambda *a, **k: profiles.append(run_profile(*a, **k)) or profiles[-1]
    trainer = Trainer(
        model=tiny_gpt2(), args=_args(tmp_path / "cb"), train_dataset=TokenDataset(), callbacks=[callback]
    )
    trainer.train()
    history = trainer.state.log_history
    # each monitoring log holds the profile of the trained weights at its step, not the init profile again
    logged = [h for h in history if "rksp/score" in h]
    assert len(profiles) == len(logged) == 3
    for entry, taken in zip(logged, profiles):
        assert entry["rksp/spectral_radius_mean"] == pytest.approx(taken.aggregates["spectral_radius_mean"])
        assert entry["rksp/near_unit_mass_mean"] == pytest.approx(taken.aggregates["near_unit_mass_mean"])
    assert logged[2]["rksp/spectral_radius_mean"] != logged[0]["rksp/spectral_radius_mean"]
    init = history[0]
    assert init["step"] == 0
    for key in ("rksp/score", "rksp/verdict_level", "rksp/near_unit_mass_mean", "rksp/spectral_radius_mean"):
        assert key in init and math.isfinite(init[key])
    assert init["rksp/verdict_tentative"] == float(callback.profile.verdict_reason.startswith("tentative: "))
    assert [p.meta["probe"] for p in profiles] == ["training data"] * 3  # what each profile was made on
    # an aggregate whose mean is infinite (the Kreiss constant, rho > 1 at init) is left out, its spread with it
    assert math.isinf(callback.profile.aggregates["kreiss_mean"])
    assert "rksp/kreiss_mean" not in init and "rksp/kreiss_std" not in init
    assert [h["step"] for h in history if "rksp/score" in h] == [0, 2, 4]  # init + monitoring every 2 steps
    # the Trainer's own per-step logs are intact, and profiling did not perturb training (same losses)
    assert _loss_steps(trainer) == [1, 2, 3, 4]
    assert [h["loss"] for h in history if "loss" in h] == [h["loss"] for h in plain.state.log_history if "loss" in h]
    saved = json.loads((tmp_path / "cb" / "rksp_profile.json").read_text())
    assert saved["verdict"] == callback.init_verdict and len(saved["layers"]) == 4
    assert "not bound to its Trainer" not in caplog.text  # report_to="none": no integration misses the metrics
    assert (tmp_path / "cb" / "rksp_report.md").read_text().strip()
    assert (tmp_path / "cb" / "rksp_profile.png").stat().st_size > 0


def test_high_risk_auto_kss_follows_the_measurements_and_leaves_kss_off(tmp_path, caplog):
    # the paper's rule would switch KSS on at a high-risk verdict; results/kss_v2.md found no benefit in the paper's
    # own regime, so auto_kss keeps it off, says why, and does not recommend KSS
    callback = RKSPCallback(auto_kss=True, **SMALL)
    trainer = KSSTrainer(
        model=no_norm_gpt2(),
        args=_args(tmp_path, KSSTrainingArguments, kss_enabled=False, kss_every_n_steps=2, max_steps=3),
        train_dataset=TokenDataset(),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert callback.init_verdict == "high risk"
    assert "HIGH RISK" in caplog.text and "results/kss_v2.md" in caplog.text
    assert "KSS is off (kss_enabled=False) and stays off" in caplog.text
    assert "train with KSS" not in caplog.text and "KSS switched on" not in caplog.text
    assert "not bound to its Trainer" not in caplog.text  # a KSSTrainer binds the callback itself
    assert not trainer.kss_config.enabled and trainer.kss_steps == []
    assert any(h.get("kss/auto_enabled") == 0.0 for h in trainer.state.log_history)
    assert not any("kss/penalty" in h for h in trainer.state.log_history)


def test_auto_kss_leaves_an_explicit_kss_choice_alone(tmp_path):
    callback = RKSPCallback(auto_kss=True, **SMALL)
    trainer = KSSTrainer(
        model=no_norm_gpt2(),
        args=_args(tmp_path, KSSTrainingArguments, kss_enabled=True, kss_every_n_steps=2, max_steps=3),
        train_dataset=TokenDataset(),
        callbacks=[callback],
    )
    trainer.train()
    assert callback.init_verdict == "high risk" and trainer.kss_config.enabled and trainer.kss_steps == [0, 2]


def test_guard_stops_huge_lr_run_without_saving_the_diverged_step(tmp_path):
    callback = RKSPCallback(**SMALL)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=_args(tmp_path, max_steps=20, learning_rate=3.0, save_strategy="steps", save_steps=1),
        train_dataset=TokenDataset(n=128),
        callbacks=[callback],
    )
    output = trainer.train()
    event = callback.divergence
    assert event is not None and trainer.state.global_step == event["step"] < 20
    assert any("loss > 50" in c or "gradient norm" in c for c in event["causes"])
    assert not (tmp_path / f"checkpoint-{event['step']}").exists()  # the diverged step was not saved
    # ... and the checkpoint before it holds the weights the trip was measured on: suspect (renamed), not "last good"
    suspect = tmp_path / f"_suspect-checkpoint-{event['step'] - 1}"
    assert event["suspect_checkpoints"] == [str(suspect)] and suspect.is_dir()
    assert event["last_good_checkpoint"] != event["suspect_checkpoints"][0]
    # divergence is visible in what train() returns and in trainer.state
    assert output.metrics["rksp/diverged"] == 1.0
    assert output.metrics["rksp/diverged_step"] == event["step"]
    assert output.metrics["rksp/diverged_cause"] == event["cause_flags"] > 0
    assert any(h.get("rksp/diverged") == 1.0 for h in trainer.state.log_history)
    record = json.loads((tmp_path / "rksp_guard.json").read_text())
    assert record["diverged"] and record["events"][-1]["step"] == event["step"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_guard_judges_the_model_loss_not_the_kss_objective(tmp_path):
    # alpha * L_KSS is unbounded (5e9 seen on a Mixtral run whose task loss was ~10): a huge penalty value must not be
    # read as "loss > 50", while the logged loss stays the objective
    callback = RKSPCallback(**SMALL)
    trainer = KSSTrainer(
        model=tiny_gpt2(),
        args=_args(tmp_path, KSSTrainingArguments, max_steps=3, kss_alpha=1e4, kss_every_n_steps=1),
        train_dataset=TokenDataset(n=64),
        callbacks=[callback],
    )
    trainer.train()
    objective = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert max(objective) > 50  # the objective really is above the paper's threshold
    assert callback.divergence is None and trainer.state.global_step == 3


class NaNAtStep(Trainer):
    """A TRL-style subclass (own compute_loss) whose block `layer` emits NaN from optimizer step `step` on."""

    def __init__(self, *args, nan_step=2, layer=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_step, self.layer = nan_step, layer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mlp = self.accelerator.unwrap_model(model).transformer.h[self.layer].mlp
        poison = None
        if self.state.global_step + 1 >= self.nan_step:  # NaN born inside the block (e.g. an overflow in its MLP)
            poison = mlp.register_forward_hook(lambda module, args, out: out * float("nan"))
        try:
            outputs = model(**inputs)
        finally:
            if poison is not None:
                poison.remove()
        loss = outputs.loss
        return (loss, outputs) if return_outputs else loss


def test_guard_reads_raw_loss_despite_nan_filter_and_names_first_bad_block(tmp_path):
    callback = RKSPCallback(**SMALL)
    trainer = NaNAtStep(
        model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=TokenDataset(), callbacks=[callback]
    )
    assert trainer.args.logging_nan_inf_filter  # default: the NaN step loss never shows in the logs
    trainer.train()
    event = callback.divergence
    assert event["step"] == 2 and trainer.state.global_step == 2
    assert event["first_bad_layer"] == "transformer.h.1"
    assert event["loss"] == "nan"
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)  # the filter hid it
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_restores_callback_state_and_kss(tmp_path, monkeypatch):
    def make(sub, steps, resume=None):
        callback = RKSPCallback(auto_kss=True, **SMALL)
        trainer = KSSTrainer(
            model=no_norm_gpt2(),
            args=_args(
                tmp_path / sub, KSSTrainingArguments, max_steps=steps, kss_enabled=False, kss_every_n_steps=1,
                save_strategy="steps", save_steps=2, restore_callback_states_from_checkpoint=True,
                learning_rate=1e-3,
            ),
            train_dataset=TokenDataset(n=32),
            callbacks=[callback],
        )
        return trainer

    full = make("full", 4)
    full.train()
    first = make("run", 2)
    first.train()
    stored = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    attrs = stored["stateful_callbacks"]["RKSPCallback"]["attributes"]
    assert attrs["init_verdict"] == "high risk" and "kss_auto_enabled" not in attrs
    # checkpoint-2 is the run's last step: no later step validated it, so it is not named "last good"
    assert attrs["last_good_checkpoint"] is None

    def no_profile(*a, **k):
        raise AssertionError("a resumed run must not re-profile 'at init'")

    monkeypatch.setattr(callback_module.RKSPCallback, "_run_profile", no_profile)
    resumed = make("run", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    restored = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, RKSPCallback)]
    assert len(restored) == 1 and restored[0].init_verdict == "high risk"
    assert not resumed.kss_config.enabled  # the restored decision (KSS off) holds after resume
    tail = [(h["step"], h["loss"], h.get("kss/penalty")) for h in resumed.state.log_history if "loss" in h][2:]
    ref = [(h["step"], h["loss"], h.get("kss/penalty")) for h in full.state.log_history if "loss" in h][2:]
    assert [t[0] for t in tail] == [3, 4] and tail[0][2] is None
    for (s1, l1, p1), (s2, l2, p2) in zip(tail, ref):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5) and p1 is None and p2 is None


def test_seq2seq_trainer_profiles_both_stacks(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    callback = RKSPCallback(**SMALL)
    trainer = Seq2SeqTrainer(
        model=model, args=_args(tmp_path, Seq2SeqTrainingArguments, max_steps=2),
        train_dataset=TokenDataset(n=8), callbacks=[callback],
    )
    trainer.train()
    assert callback.profile is not None and set(callback.profile.stacks) == {"encoder", "decoder"}
    assert "rksp/score" in trainer.state.log_history[0] or "rksp/verdict_level" in trainer.state.log_history[0]
    assert _loss_steps(trainer) == [1, 2] and callback.divergence is None


def test_peft_model_is_profiled_through_base_blocks(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_gpt2(n_layer=2), peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                    fan_in_fan_out=True))
    callback = RKSPCallback(**SMALL)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                      callbacks=[callback])
    trainer.train()
    assert callback.profile.names == ["transformer.h.0", "transformer.h.1"]


def test_argument_validation():
    with pytest.raises(ValueError, match="every_n_steps"):
        RKSPCallback(every_n_steps=-1)
    with pytest.raises(TypeError, match=r"lr_backoff must be a number in \(0, 1\].*str '0.5'"):
        RKSPCallback(lr_backoff="0.5")
    with pytest.raises(TypeError, match="probe_inputs"):
        RKSPCallback(probe_inputs=[1, 2, 3])


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 1}, "num_samples must be an int >= 2, got 1"),
    ({"num_samples": "2048"}, "num_samples must be an int >= 2"),
    ({"monitor_num_samples": 0}, "monitor_num_samples must be an int >= 2"),
    ({"probe_batch_size": 2.5}, "probe_batch_size must be an int >= 1"),
    ({"probe_batch_size": True}, "probe_batch_size must be an int >= 1"),
    ({"rank": 0}, r"rank must be None \(the full spectrum\) or an int >= 1"),
    ({"seed": "a"}, "seed must be an int"),
    ({"layers": 5}, "layers must be None"),
    ({"guard": "yes"}, "guard must be True or False"),
    ({"auto_kss": 1}, "auto_kss must be True or False"),
])
def test_bad_arguments_fail_at_construction_not_at_train_begin(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=f"RKSPCallback: {message}"):
        RKSPCallback(**kwargs)
    RKSPCallback(layers="model.layers", rank=32, num_samples=2, monitor_num_samples=2, probe_batch_size=1)
    import numpy as np

    callback = RKSPCallback(probe_batch_size=np.int64(4), num_samples=np.int32(256))  # numpy integers are counts too
    assert (callback.probe_batch_size, callback.num_samples) == (4, 256) and type(callback.num_samples) is int
    steps = RKSPCallback(every_n_steps=np.int64(10), max_rollbacks=np.int64(2), snapshot_every_n_steps=np.int64(5),
                         check_every_n_steps=np.int32(2))
    assert (steps.every_n_steps, steps.max_rollbacks, steps.snapshot_every_n_steps, steps.check_every_n_steps) == (
        10, 2, 5, 2) and all(type(v) is int for v in (steps.every_n_steps, steps.max_rollbacks))
    for name in ("every_n_steps", "max_rollbacks", "check_every_n_steps", "snapshot_every_n_steps"):
        with pytest.raises(ValueError, match=name):
            RKSPCallback(**{name: True})  # a bool is not a count


def test_replica_processes_profile_without_repeating_the_main_processs_warnings(tmp_path, caplog, monkeypatch):
    # in a distributed run every process profiles the same probe; only the local main process says what it found
    monkeypatch.setattr(Trainer, "is_local_process_zero", lambda self: False)
    callback = RKSPCallback(probe_batch_size=2, num_samples=10_000, monitor_num_samples=10_000, every_n_steps=1,
                            guard=False, save_artifacts=False)
    trainer = Trainer(model=no_norm_gpt2(), args=_args(tmp_path, max_steps=2), train_dataset=TokenDataset(),
                      callbacks=[callback])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert callback.profile is not None and any("rksp/near_unit_mass_mean" in e for e in trainer.state.log_history)
    assert "RKSP" not in caplog.text, caplog.text  # main process (below): the short probe and the verdict are said
    monkeypatch.undo()
    trainer = Trainer(model=no_norm_gpt2(), args=_args(tmp_path, max_steps=2), train_dataset=TokenDataset(),
                      callbacks=[RKSPCallback(probe_batch_size=2, num_samples=10_000, monitor_num_samples=10_000,
                                              every_n_steps=1, guard=False, save_artifacts=False)])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "fewer than num_samples=10000" in caplog.text and "fewer than monitor_num_samples=10000" in caplog.text


def test_an_image_probe_too_small_names_the_callbacks_knobs_once(tmp_path, caplog):
    from transformers import ViTConfig, ViTForImageClassification

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": torch.tensor(i % 3)}

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=3)
    callback = RKSPCallback(every_n_steps=1, guard=False, save_artifacts=False, probe_batch_size=8)
    trainer = Trainer(model=ViTForImageClassification(config), args=_args(tmp_path, max_steps=3),
                      train_dataset=Images(), callbacks=[callback])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    tokens = 8 * 17  # probe_batch_size images, 16 patches and a [CLS] token each
    assert caplog.text.count(f"gives {tokens} token states to some layers, fewer than num_samples=2048") == 1
    assert caplog.text.count(f"holds {tokens} token states, fewer than monitor_num_samples=512") == 1
    assert caplog.text.count("valid token states reached some layers") == 1  # profile()'s own, at init only
    # a hierarchical model (stages see different counts): profile()'s note at init and at the first monitoring
    # profile, the callback's knobs once each, then quiet
    from transformers import SwinConfig, SwinForImageClassification

    caplog.clear()
    swin = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                      num_labels=3)
    trainer = Trainer(model=SwinForImageClassification(swin), args=_args(tmp_path, max_steps=4),
                      train_dataset=Images(), callbacks=[RKSPCallback(every_n_steps=1, guard=False, probe_batch_size=8,
                                                                      save_artifacts=False)])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert caplog.text.count("valid token states reached some layers") == 2
    assert caplog.text.count("to some layers, fewer than monitor_num_samples=512") == 1


def test_a_probe_batch_smaller_than_num_samples_names_the_callbacks_knobs(tmp_path, caplog):
    callback = RKSPCallback(probe_batch_size=2, num_samples=10_000, rank=8, guard=False)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                      callbacks=[callback])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    tokens = 2 * TokenDataset().ids.shape[1]
    assert f"probe batch holds {tokens} token states, fewer than num_samples=10000" in caplog.text
    assert "raise probe_batch_size" in caplog.text and "pass more inputs" not in caplog.text
    assert callback.profile.settings["num_samples"] == tokens  # profiled on what the batch holds
    # monitoring names its own setting, once per run however many monitoring steps
    caplog.clear()
    monitor = RKSPCallback(probe_batch_size=2, num_samples=32, monitor_num_samples=10_000, every_n_steps=1, rank=8,
                           guard=False)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path / "m", max_steps=3), train_dataset=TokenDataset(),
            callbacks=[monitor]).train()
    assert caplog.text.count("fewer than monitor_num_samples=10000") == 1 and "lower monitor_num_samples" in caplog.text


def test_probe_token_count_reads_only_a_2d_mask():
    ids = torch.ones(2, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert callback_module._token_count({"input_ids": ids}) == 10
    assert callback_module._token_count({"input_ids": ids, "attention_mask": mask}) == 8
    # a 4-D or additive mask says nothing countable: no count, so num_samples is left as asked
    assert callback_module._token_count({"input_ids": ids, "attention_mask": torch.zeros(2, 1, 5, 5)}) is None
    assert callback_module._token_count({"pixel_values": torch.randn(1, 3, 4, 4)}) is None
    # a text and an image tower (CLIP, LLaVA): the text count is not every layer's
    assert callback_module._token_count({"input_ids": ids, "pixel_values": torch.randn(1, 3, 4, 4)}) is None


def test_unbound_callback_warns_once_when_integrations_would_miss_its_metrics(caplog):
    from types import SimpleNamespace

    from transformers import TrainerState

    callback, state = RKSPCallback(), TrainerState()
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            state.global_step = step
            callback._log(SimpleNamespace(report_to=["tensorboard"]), state, {"rksp/score": 0.5})
    unbound = [r for r in caplog.records if "not bound to its Trainer" in r.getMessage()]
    assert len(unbound) == 1 and "callback.bind(trainer)" in unbound[0].getMessage()
    assert [h["step"] for h in state.log_history] == [0, 1, 2]  # the metrics still reach log_history


def test_seq2seq_probe_leaves_the_decoder_padding_out_through_the_labels(tmp_path):
    # DataCollatorForSeq2Seq batches carry decoder_input_ids and labels padded with -100, but no decoder mask: the
    # probe keeps the labels so that profile() reads the decoder's real positions from them
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_decoder_layers=1, num_heads=4, decoder_start_token_id=0))
    lengths = [2 + i % 5 for i in range(8)]  # 32 real target tokens on an (8, 6) grid

    def collate(items):
        width = max(len(item["labels"]) for item in items)
        labels = torch.tensor([item["labels"] + [-100] * (width - len(item["labels"])) for item in items])
        return {"input_ids": torch.stack([item["input_ids"] for item in items]),
                "attention_mask": torch.ones(len(items), 6, dtype=torch.long), "labels": labels,
                "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}

    items = [{"input_ids": torch.randint(1, 64, (6,)), "labels": list(range(1, 1 + n))} for n in lengths]
    callback = RKSPCallback(num_samples=16, probe_batch_size=8)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1, remove_unused_columns=False),
                      train_dataset=items, data_collator=collate, callbacks=[callback])
    trainer.train()
    seen = callback.profile.meta["tokens_seen_per_layer"]
    assert seen["encoder.block.0"] == 48 and seen["decoder.block.0"] == sum(lengths)


class _Seq2SeqRows(torch.utils.data.Dataset):
    """Source rows of 16 tokens and label rows of 6 (the last 2 padded with -100), as DataCollatorForSeq2Seq pads."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        labels = torch.randint(2, 50, (6,), generator=g)
        labels[4:] = -100
        ids = torch.randint(2, 50, (16,), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_a_seq2seq_probe_profiles_the_decoder_on_its_labels_and_names_the_knob(tmp_path, caplog):
    from transformers import T5ForConditionalGeneration

    from hf_koopman.testing_utils import tiny_config

    model = T5ForConditionalGeneration(tiny_config("t5"))
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=1e-3, save_strategy="no")
    callback = RKSPCallback(num_samples=48, probe_batch_size=8)
    with caplog.at_level("WARNING"):
        Trainer(model=model, args=args, train_dataset=_Seq2SeqRows(), callbacks=[callback]).train()
    seen = callback.profile.meta["tokens_seen_per_layer"]
    assert all(n == 8 * 4 for name, n in seen.items() if name.startswith("decoder."))  # the labels, not 8 x 16
    assert "labels hold 32 decoder token states, fewer than num_samples=48" in caplog.text
    assert "raise probe_batch_size" in caplog.text
    caplog.clear()  # an encoder probe short of num_samples too: the decoder's message still quotes the setting
    short = RKSPCallback(num_samples=200, probe_batch_size=8, guard=False, save_artifacts=False)
    with caplog.at_level("WARNING"):
        Trainer(model=T5ForConditionalGeneration(tiny_config("t5")), args=cpu_training_args(
            tmp_path / "s", TrainingArguments, max_steps=1, save_strategy="no"), train_dataset=_Seq2SeqRows(),
            callbacks=[short]).train()
    assert "holds 128 token states, fewer than num_samples=200" in caplog.text
    assert "labels hold 32 decoder token states, fewer than num_samples=200" in caplog.text
    caplog.clear()  # a probe that holds all 16 training rows: more rows cannot help, a longer probe can
    whole = RKSPCallback(num_samples=300, probe_batch_size=16, guard=False, save_artifacts=False)
    with caplog.at_level("WARNING"):
        Trainer(model=T5ForConditionalGeneration(tiny_config("t5")), args=cpu_training_args(
            tmp_path / "w", TrainingArguments, max_steps=1, save_strategy="no"), train_dataset=_Seq2SeqRows(),
            callbacks=[whole]).train()
    assert caplog.text.count("the probe already holds all 16 training examples: pass a longer probe") == 2
    assert "raise probe_batch_size" not in caplog.text
    caplog.clear()  # monitoring: its own setting, once per run
    monitor = RKSPCallback(num_samples=16, monitor_num_samples=40, every_n_steps=1, probe_batch_size=8, guard=False)
    args = cpu_training_args(tmp_path / "m", TrainingArguments, max_steps=3, learning_rate=1e-3, save_strategy="no")
    with caplog.at_level("WARNING"):
        Trainer(model=model, args=args, train_dataset=_Seq2SeqRows(), callbacks=[monitor]).train()
    assert caplog.text.count("decoder token states, fewer than monitor_num_samples=40") == 1


def test_a_seq2seq_probe_with_decoder_inputs_from_the_collator_is_named_once(tmp_path, caplog):
    """DataCollatorForSeq2Seq(model=...) adds decoder_input_ids (the labels shifted): the decoder still reads as many
    token states as the labels hold, and the short-probe warning comes once per setting, not at every monitoring
    step."""
    from transformers import DataCollatorForSeq2Seq, T5ForConditionalGeneration

    from hf_koopman.testing_utils import tiny_config

    model = T5ForConditionalGeneration(tiny_config("t5"))

    def collate(rows):
        batch = torch.utils.data.default_collate(rows)
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch

    monitor = RKSPCallback(num_samples=48, monitor_num_samples=40, every_n_steps=1, probe_batch_size=8, guard=False,
                           save_artifacts=False)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=3, learning_rate=1e-3, save_strategy="no")
    with caplog.at_level("WARNING"):
        Trainer(model=model, args=args, train_dataset=_Seq2SeqRows(), data_collator=collate,
                callbacks=[monitor]).train()
    assert caplog.text.count("decoder token states, fewer than monitor_num_samples=40") == 1
    assert caplog.text.count("labels hold 32 decoder token states, fewer than num_samples=48") == 1
    assert "valid token states reached some layers" not in caplog.text  # profile()'s own note, said by the callback


def test_two_guards_on_one_trainer_one_rolling_back_are_refused_before_the_first_step(tmp_path):
    model = tiny_gpt2()
    callbacks = [RKSPCallback(**SMALL), RKSPCallback(on_divergence="rollback", **SMALL)]
    trainer = Trainer(model=model, args=_args(tmp_path / "two"), train_dataset=TokenDataset(), callbacks=callbacks)
    with pytest.raises(ValueError, match="two RKSPCallbacks with the divergence guard on .* lr_backoff applied twice"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not any(c._loss_tap or c._grad_tap or c._watch for c in callbacks)  # no hooks left on the model
    monitor = RKSPCallback(guard=False, every_n_steps=2, **SMALL)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path / "ok"), train_dataset=TokenDataset(),
            callbacks=[RKSPCallback(**SMALL), monitor]).train()  # one guard and one monitor: fine


class _OwnResidualMLP(torch.nn.Module):
    """A user's own model: no transformers metadata and no block list, its skip connection in this forward."""

    def __init__(self, vocab: int = 64, width: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, labels=None, attention_mask=None):
        h = self.emb(input_ids)
        logits = self.out(h + self.mlp(h))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def test_a_model_without_discoverable_blocks_trains_with_the_guard_and_no_profile(tmp_path, caplog):
    # adding the callback to a run that trains never stops it: the profile is left out with a warning naming
    # layers=, monitoring is skipped, and the guard still judges every step
    callback = RKSPCallback(every_n_steps=2, on_divergence="rollback", **SMALL)
    trainer = Trainer(model=_OwnResidualMLP(), args=_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        trainer.train()
    assert trainer.state.global_step == 4 and callback.profile is None
    assert "RKSPCallback: no spectral profile (at initialisation or monitoring) in this run" in caplog.text
    assert "Training runs on with the divergence guard" in caplog.text
    assert "RKSP monitoring at step" not in caplog.text
    assert not any(k.startswith("rksp/score") for h in trainer.state.log_history for k in h)
    assert trainer.state.log_history[-1]["rksp/diverged"] == 0.0  # the guard judged the run


@pytest.mark.parametrize("profile_at_init", [True, False])
def test_an_explicit_layers_path_naming_torch_layers_is_an_error_before_training(tmp_path, profile_at_init):
    # also for the guard alone, whose block-output check would read those layers
    callback = RKSPCallback(layers="mlp", profile_at_init=profile_at_init, **SMALL)
    trainer = Trainer(model=_OwnResidualMLP(), args=_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback])
    with pytest.raises(ValueError, match="not residual blocks"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_reading_the_probe_leaves_the_training_run_unchanged(tmp_path):
    """A collator that masks at random (as masked-LM collators do) draws from the global random generators: the
    probe the callback builds from the training data must not shift those draws, so the run's losses are the ones
    it has without the callback."""
    import random as python_random

    import numpy as np

    def masking_collator(rows):
        batch = torch.utils.data.default_collate(rows)
        share = 0.25 + 0.25 * np.random.rand() + 0.25 * python_random.random()  # every generator shapes the mask
        keep = torch.rand(batch["labels"].shape) < share
        batch["labels"] = torch.where(keep, batch["labels"], torch.full_like(batch["labels"], -100))
        return batch

    losses = {}
    for label, callbacks in {"plain": [], "callback": [RKSPCallback(num_samples=64, guard=False,
                                                                    save_artifacts=False)]}.items():
        args = cpu_training_args(tmp_path / label, TrainingArguments, max_steps=4)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(n=32),
                          data_collator=masking_collator, callbacks=callbacks)
        trainer.train()
        losses[label] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["plain"]) == 4 and losses["callback"] == losses["plain"]


def test_a_callback_bound_to_one_trainer_logs_a_later_trainers_run_into_that_run(tmp_path):
    """bind(A), train A; then the same callback in a new Trainer B that was not bound: B's rksp/* metrics go to B's
    log history, not into A's."""
    callback = RKSPCallback(num_samples=64, guard=False, save_artifacts=False)
    first = Trainer(model=tiny_gpt2(), args=cpu_training_args(tmp_path / "a", TrainingArguments, max_steps=1),
                    train_dataset=TokenDataset(), callbacks=[callback])
    callback.bind(first)
    first.train()
    before = len(first.state.log_history)
    second = Trainer(model=tiny_gpt2(seed=1), args=cpu_training_args(tmp_path / "b", TrainingArguments, max_steps=1),
                     train_dataset=TokenDataset(), callbacks=[callback])
    second.train()
    assert len(first.state.log_history) == before
    assert any("rksp/score" in h for h in second.state.log_history)


def test_probe_inputs_take_what_a_tokenizer_returns(tmp_path):
    """`probe_inputs=tokenizer(texts, return_tensors="pt")` is a BatchEncoding (a Mapping, not a dict): accepted."""
    from transformers import BatchEncoding

    ids = torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    probe = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    callback = RKSPCallback(num_samples=32, guard=False, save_artifacts=False, probe_inputs=probe)
    Trainer(model=tiny_gpt2(), args=cpu_training_args(tmp_path, TrainingArguments, max_steps=1),
            train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert callback.profile.meta["tokens_seen"] == 64 and callback.profile.meta["probe"] == "probe_inputs"
    with pytest.raises(TypeError, match="BatchEncoding a tokenizer returns"):
        RKSPCallback(probe_inputs=[ids])


def test_settings_a_checkpoint_cannot_hold_are_saved_without_them_and_their_loss_is_said(tmp_path, caplog):
    """layers= given as modules and probe_inputs cannot go into trainer_state.json: the save writes the rest (it
    failed on the modules), and with restore_callback_states_from_checkpoint=True the first run says a resume will
    lose them and the resumed (rebuilt) callback says it runs without them."""
    model = tiny_gpt2()
    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))

    def callback():
        return RKSPCallback(num_samples=32, guard=False, save_artifacts=False, layers=list(model.transformer.h),
                            probe_inputs={"input_ids": ids}, every_n_steps=1)

    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=2, save_strategy="steps", save_steps=1,
                             restore_callback_states_from_checkpoint=True)
    with caplog.at_level(logging.WARNING):
        Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback()]).train()
    assert "a resume of this run restores callback states" in caplog.text and "layers and probe_inputs" in caplog.text
    saved = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["RKSPCallback"]["args"]["layers"] is None
    assert saved["RKSPCallback"]["attributes"]["settings_not_restored"] == ["layers", "probe_inputs"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback()]).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "rebuilt from the checkpoint's callback state" in caplog.text
    assert "auto-discovered blocks and the training data's first examples" in caplog.text


def test_a_collator_returning_tuples_falls_back_to_synthetic_inputs_and_names_probe_inputs(tmp_path, caplog):
    """A collator whose batches are not mappings (a tuple) leaves the probe to synthetic tokens: the warning says so
    and names probe_inputs=."""

    def tuples(rows):
        batch = torch.utils.data.default_collate(rows)
        return batch["input_ids"], batch["labels"]

    callback = RKSPCallback(num_samples=64, guard=False, save_artifacts=False)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, remove_unused_columns=False)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), data_collator=tuples,
                      callbacks=[callback])
    with caplog.at_level(logging.WARNING):
        callback.on_train_begin(args, trainer.state, trainer.control, model=trainer.model,
                                train_dataloader=trainer.get_train_dataloader())
    assert "profiling on synthetic inputs instead" in caplog.text and "probe_inputs=" in caplog.text
    assert callback.profile is not None and callback.profile.meta["probe"] == "default"


def test_the_decoder_count_follows_profile_when_the_batch_has_a_decoder_mask():
    from transformers import T5ForConditionalGeneration

    from hf_koopman.profiling import profile
    from hf_koopman.testing_utils import tiny_config
    from hf_koopman.training.callback import _decoder_token_count

    model = T5ForConditionalGeneration(tiny_config("t5"))
    labels = torch.full((2, 6), 5)
    labels[:, 4:] = -100
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, 5:] = 0
    batch = {"input_ids": torch.randint(2, 50, (2, 16)), "labels": labels, "decoder_attention_mask": mask,
             "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}
    seen = profile(model, batch, num_samples=8).meta["tokens_seen_per_layer"]["decoder.block.0"]
    assert _decoder_token_count(batch, model) == seen == 10
    from_labels = {k: v for k, v in batch.items() if k != "decoder_input_ids"}  # profile() builds them from labels
    seen = profile(model, from_labels, num_samples=8).meta["tokens_seen_per_layer"]["decoder.block.0"]
    assert _decoder_token_count(from_labels, model) == seen == 10


class _ShortRows(torch.utils.data.Dataset):
    """600 rows of 10 token ids: short sentences, as in a classification dataset."""

    def __len__(self) -> int:
        return 600

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.arange(10) + i % 50}


def _stack_rows(items):
    return {"input_ids": torch.stack([item["input_ids"] for item in items])}


def test_the_default_probe_takes_as_many_text_rows_as_num_samples_needs():
    loader = torch.utils.data.DataLoader(_ShortRows(), batch_size=4, collate_fn=_stack_rows)
    model = tiny_gpt2()
    assert RKSPCallback(num_samples=300)._build_probe(model, loader)["input_ids"].shape == (30, 10)
    assert RKSPCallback(num_samples=300, probe_batch_size=8)._build_probe(model, loader)["input_ids"].shape[0] == 8
    assert RKSPCallback(num_samples=40)._build_probe(model, loader)["input_ids"].shape[0] == 8  # at least 8 rows
    assert RKSPCallback(num_samples=100_000)._build_probe(model, loader)["input_ids"].shape[0] == 512  # at most 512
    iterable_rows = type("Stream", (torch.utils.data.IterableDataset,),
                         {"__iter__": lambda self: iter(_ShortRows()[i] for i in range(600))})()
    iterable = torch.utils.data.DataLoader(iterable_rows, batch_size=4, collate_fn=_stack_rows)
    assert RKSPCallback(num_samples=300)._build_probe(model, iterable)["input_ids"].shape == (30, 10)


def test_the_init_profile_reads_as_many_token_states_as_the_width_needs():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # only its config is read
        wide = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=1, n_head=8, vocab_size=100))
    assert RKSPCallback()._num_samples(wide) == 2681  # profile()'s default_num_samples
    assert RKSPCallback(num_samples=300)._num_samples(wide) == 300
    assert RKSPCallback()._num_samples(tiny_gpt2()) == 2048


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 200

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)),
                "labels": torch.tensor(i % 3)}


def test_the_default_probe_takes_as_many_images_as_the_patch_grid_needs():
    from transformers import ViTConfig, ViTForImageClassification, default_data_collator

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    loader = torch.utils.data.DataLoader(_Images(), batch_size=4, collate_fn=default_data_collator)
    # 16 patches an image: 160 token states take 10 images, 2048 the most an image probe takes (64)
    assert RKSPCallback(num_samples=160)._build_probe(model, loader)["pixel_values"].shape[0] == 10
    assert RKSPCallback()._build_probe(model, loader)["pixel_values"].shape[0] == 64
    assert RKSPCallback(probe_batch_size=8)._build_probe(model, loader)["pixel_values"].shape[0] == 8
    assert RKSPCallback(num_samples=16)._build_probe(model, loader)["pixel_values"].shape[0] == 8  # at least 8


class _PaddedRows(torch.utils.data.Dataset):
    """Rows of 12 real tokens padded to 128 positions, as a tokenizer called with padding="max_length" gives."""

    def __len__(self) -> int:
        return 600

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(128, dtype=torch.long)
        mask[:12] = 1
        return {"input_ids": (torch.arange(128) + i) % 90 * mask, "attention_mask": mask}


def test_the_default_probe_does_not_grow_into_padding():
    """The probe is one forward (repeated at each monitoring step): trailing padding columns are dropped, and its
    positions stay within 2 x num_samples."""
    from transformers import default_data_collator

    loader = torch.utils.data.DataLoader(_PaddedRows(), batch_size=4, collate_fn=default_data_collator)
    probe = RKSPCallback(num_samples=2048)._build_probe(tiny_gpt2(), loader)
    assert probe["input_ids"].shape == (171, 12) and int(probe["attention_mask"].sum()) == 2052
    left = {"input_ids": torch.ones(2, 6, dtype=torch.long), "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1]] * 2)}
    assert callback_module._trim_padding(left)["input_ids"].shape == (2, 6)  # left padding: positions would shift
    both = {**left, "pixel_values": torch.zeros(2, 6, 4, 4)}  # an image beside the text: nothing is cut
    assert callback_module._trim_padding(both)["pixel_values"].shape == (2, 6, 4, 4)


def test_monitoring_reads_enough_token_states_for_a_verdict_by_default():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # only its config is read
        wide = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=1, n_head=8, vocab_size=100))
    assert RKSPCallback()._monitor_num_samples(wide) == 2048  # 2 x d: N/d = 0.5 at 512 would read nothing
    assert RKSPCallback(num_samples=1500)._monitor_num_samples(wide) == 1500  # never more than the init profile
    assert RKSPCallback(monitor_num_samples=256)._monitor_num_samples(wide) == 256
    assert RKSPCallback()._monitor_num_samples(tiny_gpt2()) == 512


class _VaryingRows(torch.utils.data.Dataset):
    """Texts of 6 to 30 tokens, which a collator pads to the longest row of each batch."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": list(range(10, 16 + (0 if i < 8 else (i * 7) % 25)))}  # the first 8 rows short


def _pad_to_longest(items):
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_a_probe_padded_to_its_longest_row_keeps_as_many_rows_as_fit():
    """The first 8 rows pad shorter than later ones: the grown probe takes the rows that fit 2 x num_samples positions
    at the longer padding, not the first 8 again."""
    loader = torch.utils.data.DataLoader(_VaryingRows(), batch_size=4, collate_fn=_pad_to_longest)
    probe = RKSPCallback(num_samples=2048)._build_probe(tiny_gpt2(), loader)
    assert probe["input_ids"].numel() <= 2 * 2048 and probe["input_ids"].shape[0] > 100
    assert int(probe["attention_mask"].sum()) > 2048 // 2


def test_a_short_probe_is_said_once_with_the_callbacks_knobs(tmp_path, caplog):
    """Not also as the analysis's generic "use more samples" note, nor as the estimator's uninformative warning."""
    callback = RKSPCallback(probe_batch_size=1, num_samples=2048, guard=False, save_artifacts=True)
    trainer = Trainer(model=tiny_gpt2(n_embd=64), args=_args(tmp_path, max_steps=1, learning_rate=1e-3),
                      train_dataset=TokenDataset(seq=16), callbacks=[callback])  # N = 16 < d = 64
    from hf_koopman.risk import _warn_once

    _warn_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert callback.profile.verdict == "uninformative"
    assert "raise probe_batch_size" in caplog.text
    assert "rank-limited" not in caplog.text and "predict_proba" not in caplog.text


class _OneLongRow(torch.utils.data.Dataset):
    """300 rows of 10 tokens, but row 100 holds 256."""

    def __len__(self) -> int:
        return 300

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": list(range(1, 257 if i == 100 else 11))}


class _MixedImages(torch.utils.data.Dataset):
    """8 images of 32 px, then 48 px ones: no collator stacks them all."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        size = 32 if i < 8 else 48
        return {"pixel_values": torch.full((3, size, size), float(i)), "labels": torch.tensor(i % 3)}


def test_a_probe_grows_as_far_as_its_rows_allow():
    """One long row cuts the growth where it starts, not back to a handful of rows; images that cannot be batched
    with the first ones leave the first ones as the probe, not synthetic pixels."""
    from transformers import ViTConfig, ViTForImageClassification

    loader = torch.utils.data.DataLoader(_OneLongRow(), batch_size=4, collate_fn=_pad_to_longest)
    probe = RKSPCallback(num_samples=2048)._build_probe(tiny_gpt2(), loader)
    assert probe["input_ids"].shape == (100, 10)  # the rows before the long one; with it, 4096 positions hold 16
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    images = torch.utils.data.DataLoader(_MixedImages(), batch_size=4)
    pixels = RKSPCallback(num_samples=160)._build_probe(model, images)["pixel_values"]
    assert pixels.shape == (8, 3, 32, 32) and pixels[7].eq(7.0).all()  # the training images, not random ones
