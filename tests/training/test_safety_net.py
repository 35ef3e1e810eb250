"""The divergence guard's safety net: validated "last good" state, save refusal, rollback-and-continue, resume.

Setting: tiny GPT-2, AdamW at lr 1.0, constant schedule, sequential batches of 4. Without the guard the loss runs
4.0, 22.6, 35.3, 59.9: step 4 trips the rule (loss > 50), so the weights after step 3 are suspect and the last
validated state is that after step 2 (validated by step 3's loss). At lr 0.5 the same run stays below 11 for 30 steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import LearningRates, TokenDataset, info_logs, tiny_gpt2
from conftest import blow_up_args as _args
from conftest import exact_guard as _guard
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from hf_koopman.training import DivergedModelError, KSSTrainer, KSSTrainingArguments, RKSPCallback
from hf_koopman.training.guard import DivergenceEvent
from hf_koopman.training import safety_net


BATCH = 4


def _batch_loss(model, dataset, step):
    """Loss of `model` on the batch of optimizer step `step` (1-based, sequential sampling)."""
    ids = dataset.ids[(step - 1) * BATCH : step * BATCH]
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _load(checkpoint):
    model = tiny_gpt2()
    state = load_file(f"{checkpoint}/model.safetensors")
    model.load_state_dict(state, strict=False)
    return model


def test_last_good_checkpoint_is_validated_by_the_step_after_it(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[guard])
    trainer.train()
    event = guard.divergence
    assert event["step"] == 4 and event["action"] == "stop"
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")
    assert event["suspect_checkpoints"] == [str(tmp_path / "_suspect-checkpoint-3")]  # renamed: set aside
    # the named checkpoint gives a sane loss on the batch that preceded the trip (the one that validated it) ...
    good = _batch_loss(_load(guard.last_good_checkpoint), data, 3)
    assert math.isfinite(good) and good < 50
    # ... while the checkpoint one step later is the one that produced the tripping loss
    assert _batch_loss(_load(tmp_path / "_suspect-checkpoint-3"), data, 4) > 50
    assert not (tmp_path / "checkpoint-4").exists()
    # the in-memory model went back to the validated state (= checkpoint-2)
    saved = load_file(f"{guard.last_good_checkpoint}/model.safetensors")
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in saved.items())


def test_save_model_after_a_trip_never_writes_the_diverged_weights(tmp_path):
    data = TokenDataset(n=128)
    # plain Trainer, default stop: the model in memory is the validated one, so save_model writes checkpoint-2's
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "plain"), train_dataset=data, callbacks=[guard])
    trainer.train()
    trainer.save_model(str(tmp_path / "plain" / "final"))
    final = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    good = load_file(str(tmp_path / "plain" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in good.items())
    assert _batch_loss(_load(tmp_path / "plain" / "final"), data, 3) < 50

    # KSSTrainer without restoring: the weights in memory are unvalidated, save_model refuses and names the checkpoint
    guard = _guard(restore_on_stop=False)
    out = tmp_path / "kss"
    trainer = KSSTrainer(model=tiny_gpt2(), args=_args(out, KSSTrainingArguments), train_dataset=data,
                         callbacks=[guard])
    trainer.train()
    assert not guard.weights_validated
    # only the tripping update (step 4) was undone: the model holds the suspect weights after step 3, not older ones
    suspect = load_file(str(out / "_suspect-checkpoint-3" / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in suspect.items())
    assert _batch_loss(trainer.model, data, 4) > 50
    with pytest.raises(DivergedModelError, match="checkpoint-2"):
        trainer.save_model(str(out / "final"))
    assert not (out / "final" / "model.safetensors").exists()
    # push_to_hub saves through an internal save_model call: refused before it writes or uploads anything
    written = sorted(p.name for p in out.iterdir())
    with pytest.raises(DivergedModelError, match=r"refusing to push.*push_to_hub\(\.\.\., allow_unvalidated=True\)"):
        trainer.push_to_hub()
    assert sorted(p.name for p in out.iterdir()) == written
    trainer.save_model(str(out / "final"), allow_unvalidated=True)  # asked for explicitly
    assert (out / "final" / "model.safetensors").exists()


class WeightsAt(TrainerCallback):
    """Copies the weights at the end of every step (after the guard's rollback)."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_rollback_finishes_a_run_that_would_diverge(tmp_path, caplog):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback")
    spy = WeightsAt()
    trainer = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments), train_dataset=data,
                         callbacks=[guard, spy])
    output = trainer.train()
    assert trainer.state.global_step == 12 and guard.divergence is None
    assert output.metrics["rksp/diverged"] == 0.0 and output.metrics["rksp/rollbacks"] >= 1
    rollbacks = [h for h in trainer.state.log_history if "rksp/rollbacks" in h and "rksp/rollback_step" in h]
    assert rollbacks and rollbacks[0]["rksp/rollback_step"] == 4 and rollbacks[0]["rksp/rollbacks"] == 1
    assert rollbacks[0]["rksp/rollback_cause"] == 1  # loss
    assert rollbacks[0]["rksp/lr"] == pytest.approx(0.5)
    # the diverged update is never kept: after the rollback at step 4 the weights are exactly checkpoint-2's
    good = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(spy.weights[4][k], v) for k, v in good.items())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 50
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-1] == pytest.approx(0.5 ** guard.rollbacks)
    record = json.loads((tmp_path / "rksp_guard.json").read_text())
    assert record["rollbacks"] == guard.rollbacks and record["events"][0]["restored_step"] == 2
    assert record["events"][0]["new_lr"] == pytest.approx(0.5)
    # the end of the run says what the final weights are: the last validated state plus the steps trained after it
    last = record["events"][-1]
    assert f"{guard.rollbacks} rollback(s) in this train() call" in caplog.text
    assert f"validated state of step {last['restored_step']}, with {12 - last['step']} step(s)" in caplog.text


class LogRecorder(TrainerCallback):
    """What the loggers see: `Trainer.log` calls every callback's `on_log`, as it calls W&B's or TensorBoard's."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("how", ["KSSTrainer", "Trainer + bind", "Trainer, not bound"])
def test_rollback_events_reach_the_loggers_through_trainer_log(tmp_path, how):
    data = TokenDataset(n=128)
    guard, recorder = _guard(on_divergence="rollback"), LogRecorder()
    if how == "KSSTrainer":  # binds its callbacks itself
        trainer = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments, max_steps=6),
                             train_dataset=data, callbacks=[guard, recorder])
    else:
        trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=data,
                          callbacks=[guard, recorder])
        if how == "Trainer + bind":
            guard.bind(trainer)
    trainer.train()
    event = {"rksp/rollbacks": 1.0, "rksp/rollback_step": 4.0, "rksp/rollback_cause": 1.0, "rksp/lr": 0.5}
    seen = [log for log in recorder.logs if "rksp/rollback_step" in log]
    in_history = [h for h in trainer.state.log_history if "rksp/rollback_step" in h]
    assert [{k: h[k] for k in event} for h in in_history] == [event]  # always in the history and the JSON record
    if how == "Trainer, not bound":  # no public way for a callback to reach the loggers: documented, bind() fixes it
        assert seen == []
    else:
        assert [{k: log[k] for k in event} for log in seen] == [event]


class OptimizerStateAt(TrainerCallback):
    """Copies the optimizer state at the end of every step (after the guard's rollback)."""

    def __init__(self):
        self.states = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.states[state.global_step] = {i: {k: v.clone() for k, v in entry.items()}
                                          for i, entry in optimizer.state_dict()["state"].items()}


class CopiesHeld(TrainerCallback):
    """Whether `guard` holds a CPU copy of the training state (the validated one, or the pre-run one) after each step,
    and the steps seen."""

    def __init__(self, guard: RKSPCallback) -> None:
        self.guard, self.steps, self.copies = guard, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        self.copies.append(not (self.guard._snapshot.empty and self.guard._undo.empty))


@pytest.mark.parametrize("source", ["memory", "checkpoint"])
def test_the_cpu_copies_are_freed_when_train_ends(tmp_path, source):
    guard = _guard(on_divergence="rollback", rollback_source=source)
    held = CopiesHeld(guard)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4, learning_rate=1e-3), train_dataset=TokenDataset(),
            callbacks=[guard, held]).train()
    assert held.copies == [source == "memory"] * 4  # held while training (in memory only) ...
    assert guard._snapshot.empty and guard._undo.empty and guard._candidate.empty  # ... and freed after it


def test_rollback_from_the_last_good_checkpoint_keeps_no_copy_in_memory(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    weights, moments, held = WeightsAt(), OptimizerStateAt(), CopiesHeld(guard)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data,
                      callbacks=[guard, weights, moments, held])
    trainer.train()
    assert held.steps == list(range(1, 13)) and not any(held.copies)  # nothing copied to memory, at any step
    assert trainer.state.global_step == 12 and guard.divergence is None and guard.rollbacks >= 1
    first = guard.events[0]
    assert (first["step"], first["restored_step"], first["action"]) == (4, 2, "rollback")
    # the weights and the optimizer state after the rollback are exactly those of checkpoint-2
    good = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(weights.weights[4][k], v) for k, v in good.items())
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert moments.states[4].keys() == saved.keys()
    assert all(torch.equal(moments.states[4][i][k], v) for i in saved for k, v in saved[i].items())
    # the learning rate is the backed-off one, not the checkpoint's
    assert first["new_lr"] == pytest.approx(0.5)


def test_stop_restores_the_last_good_checkpoint_and_save_model_writes_it(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(rollback_source="checkpoint")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[guard])
    trainer.train()
    assert guard.divergence["step"] == 4 and guard.divergence["restored_step"] == 2 and guard.weights_validated
    trainer.save_model(str(tmp_path / "final"))
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    good = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in good.items())


@pytest.mark.parametrize("settings, named", [({"save_strategy": "no"}, "save_strategy='no'"),
                                              ({"save_strategy": "epoch"}, "save_strategy='epoch'"),
                                              ({"save_total_limit": 2}, "save_total_limit=2")])
def test_checkpoint_rollback_refuses_settings_that_keep_no_good_checkpoint(tmp_path, settings, named):
    # no checkpoint the guard can validate, or rotation deletes it: the run would end with diverged weights
    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, **settings), train_dataset=TokenDataset(n=128),
                      callbacks=[guard])
    with pytest.raises(ValueError, match=named):
        trainer.train()


def test_checkpoint_rollback_before_a_validated_checkpoint_skips_the_tripping_update(tmp_path, caplog):
    # no CPU copy in checkpoint mode and no checkpoint validated yet: the tripping step's gradients are dropped, so
    # the optimizer leaves the weights of the step before
    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    spy = WeightsAt()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_steps=10), train_dataset=TokenDataset(n=128),
                      callbacks=[guard, spy])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert guard.divergence["step"] == 4 and guard.divergence["action"] == "stop" and not guard.weights_validated
    assert "the tripping update was discarded" in caplog.text
    assert all(torch.equal(spy.weights[4][k], v) for k, v in spy.weights[3].items())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_broken_last_good_checkpoint_stops_the_run_and_says_why(tmp_path, caplog, damage):
    class BreakCheckpoint2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # checkpoint-2 was checked and named last good at step 3
                weights = tmp_path / "checkpoint-2" / "model.safetensors"
                if damage == "delete":
                    weights.unlink()
                else:  # a half-written file: safetensors raises its own error type
                    weights.write_bytes(weights.read_bytes()[:100])

    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=TokenDataset(n=128),
                      callbacks=[guard, BreakCheckpoint2()])
    with caplog.at_level("ERROR"):
        trainer.train()
    assert "could not restore the last good checkpoint" in caplog.text and "checkpoint-2" in caplog.text
    assert "could not be read back; resume from an older checkpoint" in caplog.text
    assert guard.divergence["action"] == "stop" and not guard.weights_validated


@pytest.mark.parametrize("free_bytes, extra, expected", [
    (10**12, {}, False),  # the copy fits
    (10**3, {}, True),  # it does not, and full checkpoints are saved every step
    (10**3, {"save_total_limit": 2}, False),  # rotation could delete the last good checkpoint
    (10**3, {"save_only_model": True}, False),  # no optimizer state in the checkpoints
    (10**3, {"save_strategy": "no"}, False),
])
def test_auto_rollback_source_follows_the_free_memory_and_the_checkpoints(tmp_path, monkeypatch, free_bytes, extra,
                                                                          expected):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": free_bytes})())
    guard = _guard()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=1, **extra), train_dataset=TokenDataset(n=128),
                      callbacks=[guard])
    trainer.train()
    assert guard._from_checkpoint is expected


class SetWeightDecay(TrainerCallback):
    """Changes the optimizer's weight decay at the start of step `step` (after the checkpoints before it)."""

    def __init__(self, step, value):
        self.step, self.value = step, value

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            for group in optimizer.param_groups:
                group["weight_decay"] = self.value


def test_checkpoint_rollback_keeps_the_current_optimizer_hyperparameters(tmp_path):
    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=5), train_dataset=TokenDataset(n=128),
                      callbacks=[SetWeightDecay(3, 0.123), guard])
    trainer.train()
    assert guard.events[0]["restored_step"] == 2  # checkpoint-2 was saved with weight decay 0.0
    assert all(group["weight_decay"] == 0.123 for group in trainer.optimizer.param_groups)


def test_checkpoints_the_guard_cannot_read_back_switch_it_to_memory(tmp_path, caplog):
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers 5 saves Mixtral's fused experts under their original per-expert names
    config = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, num_local_experts=4,
                                  num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    guard = _guard(on_divergence="rollback", rollback_source="checkpoint")
    trainer = Trainer(model=model, args=_args(tmp_path, learning_rate=1e-3, max_steps=6),
                      train_dataset=TokenDataset(n=128),
                      callbacks=[logit_spike(5), guard])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "cannot restore from" in caplog.text and "under this model's names" in caplog.text
    assert not guard._from_checkpoint
    assert [(e["step"], e["action"]) for e in guard.events] == [(5, "rollback")]  # from the copy in memory
    assert guard.weights_validated and trainer.state.global_step == 6


def test_load_checkpoint_state_checks_before_it_changes_anything(tmp_path):
    from safetensors.torch import save_file

    from hf_koopman.training.guard import checkpoint_problem, load_checkpoint_state

    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="rollback_source='memory'"):
        load_checkpoint_state(model, None, tmp_path)
    partial = {k: torch.zeros_like(v) for k, v in list(model.state_dict().items())[:2]}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="lacks"):
        load_checkpoint_state(model, None, tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert "KeyError" in checkpoint_problem(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    save_file(partial, str(tmp_path / "adapter_model.safetensors"))  # a PEFT checkpoint holds adapters only
    assert checkpoint_problem(model, tmp_path).startswith("FileNotFoundError")
    model.save_pretrained(tmp_path)
    assert "no optimizer.pt" in checkpoint_problem(model, tmp_path)
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), tmp_path / "optimizer.pt")
    assert checkpoint_problem(model, tmp_path) is None


def test_rollbacks_are_bounded_then_the_guard_stops(tmp_path):
    guard = _guard(on_divergence="rollback", max_rollbacks=2, lr_backoff=1.0)  # no back-off: it keeps tripping
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=3.0), train_dataset=TokenDataset(n=128),
                      callbacks=[guard])
    trainer.train()
    assert guard.rollbacks == 2 and guard.divergence is not None and guard.divergence["action"] == "stop"
    assert trainer.state.global_step == guard.divergence["step"] < 12
    assert [e["action"] for e in guard.events] == ["rollback", "rollback", "stop"]


def test_resume_keeps_the_lowered_learning_rate(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback")
    first = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments, max_steps=8), train_dataset=data,
                       callbacks=[guard])
    first.train()
    assert guard.rollbacks >= 1 and guard.events[-1]["step"] <= 8
    # checkpoint-8 was written after the rollbacks: its scheduler state carries the lowered rate
    spy = LearningRates()
    resumed = KSSTrainer(model=tiny_gpt2(), args=_args(tmp_path, KSSTrainingArguments, max_steps=10),
                         train_dataset=data, callbacks=[_guard(on_divergence="rollback"), spy])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert spy.lrs[0] == pytest.approx(0.5 ** guard.rollbacks)


def test_resume_from_the_named_checkpoint_does_not_replay_the_blow_up(tmp_path, caplog):
    import logging

    data = TokenDataset(n=128)
    guard = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[guard]).train()
    named = guard.last_good_checkpoint
    again, spy = _guard(), LearningRates()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[again, spy])
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        trainer.train(resume_from_checkpoint=named)
    # the back-off is said, with the way to the full rate when the cause was not the rate
    assert f"move {tmp_path / safety_net.RECORD_NAME} aside before resuming" in caplog.text
    # the record says the run diverged at step 4: the resumed run starts at half the rate and gets past it
    assert again.lr_scale == pytest.approx(0.5)
    assert again.divergence is None and trainer.state.global_step == 12
    assert len(spy.lrs) == 10 and all(lr == pytest.approx(0.5) for lr in spy.lrs)


def test_a_resume_without_the_run_record_trains_at_the_full_rate(tmp_path):
    # the guide's way to resume at the full rate once the cause was not the rate: move the record out
    data = TokenDataset(n=128)
    guard = _guard()
    Trainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=data, callbacks=[guard]).train()
    (tmp_path / safety_net.RECORD_NAME).rename(tmp_path.parent / f"{tmp_path.name}-record.json")
    again, spy = _guard(), LearningRates()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=4), train_dataset=data,
                      callbacks=[again, spy])
    trainer.train(resume_from_checkpoint=guard.last_good_checkpoint)
    assert again.lr_scale == 1.0 and spy.lrs and all(lr == pytest.approx(1.0) for lr in spy.lrs)


class ScaleOutputAt(TrainerCallback):
    """Multiplies the output of the submodule `path` by `factor` during optimizer step `step` only."""

    def __init__(self, step, path, factor):
        self.step, self.path, self.factor, self.handle = step, path, factor, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if state.global_step + 1 == self.step:
            module = model.get_submodule(self.path)
            self.handle = module.register_forward_hook(lambda m, a, out: out * self.factor)


def poison(step):
    """A corrupt batch: its token embeddings are scaled by 1e30, so its activations overflow to NaN/Inf."""
    return ScaleOutputAt(step, "transformer.wte", 1e30)


def logit_spike(step):
    """A loss spike (> 50) with finite gradients and no lasting damage: the logits of one step are scaled by 1000."""
    return ScaleOutputAt(step, "lm_head", 1000)


def test_rollback_skips_a_poisoned_batch_without_sgd_or_adam_drift(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback")
    spy = WeightsAt()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8, weight_decay=0.1),
                      train_dataset=data, callbacks=[poison(5), guard, spy])
    trainer.train()
    assert [e["step"] for e in guard.events] == [5] and guard.events[0]["action"] == "rollback"
    assert guard.events[0]["restored_step"] == 3
    # weight decay and Adam's moments did not move the restored weights: exactly checkpoint-3's
    good = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(spy.weights[5][k], v) for k, v in good.items())
    assert trainer.state.global_step == 8


def test_sparser_snapshots_roll_back_to_the_last_refresh(tmp_path):
    # refreshed at the passing steps 1 and 4 (every 3): a trip at step 6 goes back to the state validated at step 4,
    # i.e. the weights after step 3, not to those after step 4 as an every-step snapshot would (no checkpoint is
    # saved, so the snapshot is the newest validated state); the weights are those a checkpoint at step 3 holds
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback", snapshot_every_n_steps=3)
    spy = WeightsAt()
    reference = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "reference", learning_rate=1e-3, max_steps=3),
                        train_dataset=data)
    reference.train()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8, save_strategy="no"),
                      train_dataset=data, callbacks=[poison(6), guard, spy])
    trainer.train()
    assert [e["step"] for e in guard.events] == [6] and guard.events[0]["restored_step"] == 3
    good = load_file(str(tmp_path / "reference" / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(spy.weights[6][k], v) for k, v in good.items())


def test_a_rollback_restores_a_validated_checkpoint_newer_than_the_snapshot(tmp_path, caplog):
    # the same run saving every step: checkpoint-4, validated by step 5's check, is newer than the snapshot of step
    # 3 and is what the rollback restores (weights and optimizer state), not the older copy in memory
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback", snapshot_every_n_steps=3)
    spy, snapshots = WeightsAt(), SnapshotSteps(guard)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8),
                      train_dataset=data, callbacks=[poison(6), guard, spy, snapshots])
    with info_logs(caplog):
        trainer.train()
    assert [e["step"] for e in guard.events] == [6] and guard.events[0]["restored_step"] == 4
    assert (f"restored the last good checkpoint {tmp_path / 'checkpoint-4'} newer than the in-memory copy of step 3"
            in caplog.text)
    assert snapshots.steps[6] == 4  # the copy is taken again from the restored state
    good = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(spy.weights[6][k], v) for k, v in good.items())
    assert trainer.state.global_step == 8


class SnapshotSteps(TrainerCallback):
    """The step of `guard`'s in-memory copy at the end of every step."""

    def __init__(self, guard):
        self.guard, self.steps = guard, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[state.global_step] = self.guard._snapshot.step


@pytest.mark.parametrize("error", [OSError("disk gone"), MemoryError(),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 4096 bytes")])
def test_a_failed_load_of_the_newer_checkpoint_restores_the_snapshot(tmp_path, monkeypatch, error):
    # a load that fails leaves the model as it was and the older copy is restored; out of memory says nothing about
    # the folder, so only another failure marks the checkpoint as one the guard cannot read back
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(safety_net, "load_checkpoint_state", fail)
    guard = _guard(on_divergence="rollback", snapshot_every_n_steps=3)
    spy = WeightsAt()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8),
                      train_dataset=TokenDataset(n=128), callbacks=[poison(6), guard, spy])
    trainer.train()
    assert guard.events[0]["restored_step"] == 3 and guard.events[0]["action"] == "rollback"
    assert guard._unreadable == (None if not isinstance(error, OSError) else str(tmp_path / "checkpoint-4"))


def test_a_resumed_run_tripping_before_any_copy_restores_its_last_good_checkpoint(tmp_path):
    # resumed from checkpoint-4 (pending), the first step trips before any in-memory copy exists: the last good
    # checkpoint the resumed state names (checkpoint-3) is the validated state to roll back to
    data = TokenDataset(n=128)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=4), train_dataset=data,
            callbacks=[_guard()]).train()
    resumed, spy = _guard(on_divergence="rollback"), WeightsAt()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=7), train_dataset=data,
                      callbacks=[poison(5), resumed, spy])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [e["step"] for e in resumed.events] == [5] and resumed.events[0]["action"] == "rollback"
    assert resumed.events[0]["restored_step"] == 3
    good = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(spy.weights[5][k], v) for k, v in good.items())
    assert trainer.state.global_step == 7 and resumed.weights_validated


@pytest.mark.parametrize("why", ["load fails", "too big"])
def test_a_resumed_run_whose_checkpoint_cannot_come_back_stops_and_says_why(tmp_path, monkeypatch, caplog, why):
    # no in-memory copy and the last good checkpoint cannot be restored: a stop, no rollback counted, no back-off,
    # the tripping update discarded, the weights not validated, and the reason shown at the default verbosity
    import logging

    data = TokenDataset(n=128)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=4), train_dataset=data,
            callbacks=[_guard()]).train()
    if why == "load fails":
        def fail(*args, **kwargs):
            raise OSError("disk gone")

        monkeypatch.setattr(safety_net, "load_checkpoint_state", fail)
    else:
        monkeypatch.setattr(safety_net, "_too_big_to_read", lambda folder: "reading it would take ~9e9 GB")
    resumed, spy = _guard(on_divergence="rollback"), WeightsAt()
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=7), train_dataset=data,
                      callbacks=[poison(5), resumed, spy])
    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    event = resumed.divergence
    assert event["step"] == 5 and event["action"] == "stop" and resumed.rollbacks == 0 and resumed.lr_scale == 1.0
    assert not resumed.weights_validated
    resumed_from = load_file(str(tmp_path / "_suspect-checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(spy.weights[5][k], v) for k, v in resumed_from.items())  # the update was discarded
    assert ("disk gone" if why == "load fails" else "reading it would take ~9e9 GB") in caplog.text


def test_an_unreadable_newer_checkpoint_leaves_the_rollback_to_the_snapshot(tmp_path, caplog):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback", snapshot_every_n_steps=3)

    class BreakCheckpoint4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after its save and before the trip: the folder loses its optimizer state
                (tmp_path / "checkpoint-4" / "optimizer.pt").unlink()

    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8),
                      train_dataset=data, callbacks=[poison(6), guard, BreakCheckpoint4()])
    with info_logs(caplog):
        trainer.train()
    assert guard.events[0]["restored_step"] == 3 and "cannot be read back" in caplog.text


def test_auto_snapshot_interval_keeps_the_copy_within_its_budget():
    guard = RKSPCallback(profile_at_init=False)
    assert guard._snapshot_interval() == 1  # nothing measured yet: refresh every passing step
    guard._step_seconds, guard._capture_seconds = 0.030, 0.001  # a 1 ms copy on a 30 ms step
    interval = guard._snapshot_interval()
    budget = safety_net._SNAPSHOT_BUDGET  # 0.25 % of the step time
    assert guard._capture_seconds / (interval * guard._step_seconds) <= budget < guard._capture_seconds / (
        (interval - 1) * guard._step_seconds)
    guard._capture_seconds = 1e-6
    assert guard._snapshot_interval() == 1


def test_a_mistyped_keyword_names_the_closest_argument():
    with pytest.raises(TypeError, match="unexpected keyword argument 'on_diverge'; did you mean 'on_divergence'"):
        RKSPCallback(on_diverge="rollback")
    with pytest.raises(TypeError, match="unexpected keyword argument 'zzz'.$"):
        RKSPCallback(zzz=1)
    import copy

    assert copy.deepcopy(RKSPCallback(on_divergence="rollback")).on_divergence == "rollback"

    class Mine(RKSPCallback):  # a subclass that takes keywords of its own and passes the rest on
        def __init__(self, note="", **kwargs):
            super().__init__(**kwargs)
            self.note = note

    assert Mine(note="x", on_divergence="rollback").note == "x"


def test_argument_validation():
    with pytest.raises(ValueError, match="on_divergence"):
        RKSPCallback(on_divergence="retry")
    with pytest.raises(ValueError, match="lr_backoff"):
        RKSPCallback(lr_backoff=0.0)
    with pytest.raises(ValueError, match="max_rollbacks"):
        RKSPCallback(max_rollbacks=-1)
    for bad in (0, "every", 1.5, True):
        with pytest.raises(ValueError, match="snapshot_every_n_steps"):
            RKSPCallback(snapshot_every_n_steps=bad)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="check_every_n_steps"):
            RKSPCallback(check_every_n_steps=bad)
    with pytest.raises(ValueError, match="thresholds"):
        RKSPCallback(loss_threshold=0)
    with pytest.raises(ValueError, match="rollback_source"):
        RKSPCallback(rollback_source="disk")


# check_every_n_steps=3 on the run above (loss 4.0, 22.6, 35.3, 59.9, ...). Checks fall on every third step, the last
# step and every step whose checkpoint is saved; step 4's loss is folded into its window and trips at the next check,
# and the state validated at the step-3 check (the weights after step 2) is the one restored


class CountObserve(TrainerCallback):
    """Counts the guard's host reads at check steps (`_observe`)."""

    def __init__(self, guard):
        self.calls = 0
        original = guard._observe

        def counted():
            self.calls += 1
            return original()

        guard._observe = counted


def test_windowed_check_trips_late_and_restores_the_state_validated_before_the_window(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(check_every_n_steps=3)
    counter = CountObserve(guard)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_strategy="no"), train_dataset=data,
                      callbacks=[guard])
    output = trainer.train()
    event = guard.divergence
    assert event["step"] == 6 and event["first_checked_step"] == 4 and event["action"] == "stop"
    assert event["restored_step"] == 2 and event["loss"] > 50
    assert counter.calls == 2  # steps 3 and 6 only
    assert output.metrics["rksp/diverged"] == 1.0 and trainer.state.global_step == 6
    assert "steps 4-6 (checked together)" in DivergenceEvent(
        step=6, causes=["x"], cause_flags=1, loss=60.0, grad_norm=1.0, first_bad_layer=None, first_checked_step=4
    ).describe()


def test_windowed_check_also_checks_every_saved_step(tmp_path):
    """A checkpoint is always followed by a check: last good and suspect checkpoints are named as with n = 1."""
    data = TokenDataset(n=128)
    guard = _guard(check_every_n_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_steps=2), train_dataset=data, callbacks=[guard])
    trainer.train()
    event = guard.divergence
    assert (event["step"], event["first_checked_step"], event["restored_step"]) == (4, 4, 2)
    assert guard.last_good_checkpoint == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists()
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(trainer.model.state_dict()[k].cpu(), v) for k, v in saved.items())


def test_windowed_check_rolls_back_and_finishes(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback", check_every_n_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_strategy="no"), train_dataset=data,
                      callbacks=[guard])
    output = trainer.train()
    assert trainer.state.global_step == 12 and guard.divergence is None
    assert output.metrics["rksp/rollbacks"] >= 1
    first = guard.events[0]
    assert (first["step"], first["first_checked_step"], first["restored_step"]) == (6, 4, 2)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(losses[-1]) and losses[-1] < 50


def test_windowed_check_catches_a_poisoned_step_between_checks(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(on_divergence="rollback", check_every_n_steps=4)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8, save_strategy="no"),
                      train_dataset=data, callbacks=[poison(6), guard])
    trainer.train()
    assert [(e["step"], e["first_checked_step"], e["restored_step"]) for e in guard.events] == [(8, 5, 3)]
    assert guard.events[0]["first_bad_layer"] is not None  # the block sums accumulated over the window


def test_a_trip_in_the_first_window_undoes_all_of_its_updates(tmp_path):
    """Nothing validated yet: the state before the window comes back (unvalidated), not only the last update's."""
    data = TokenDataset(n=128)
    initial = {k: v.clone() for k, v in tiny_gpt2().state_dict().items()}
    guard = _guard(check_every_n_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=6, save_strategy="no"),
                      train_dataset=data, callbacks=[logit_spike(2), guard])
    trainer.train()
    event = guard.divergence
    assert (event["step"], event["first_checked_step"], event["restored_step"]) == (3, 1, None)
    assert not guard.weights_validated
    assert all(torch.equal(trainer.model.state_dict()[k].cpu(), v) for k, v in initial.items())


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_training_that_ends_inside_a_window_is_still_checked(tmp_path):
    data = TokenDataset(n=128)
    guard = _guard(check_every_n_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, save_strategy="no"), train_dataset=data,
                      callbacks=[StopAfter(5), guard])
    output = trainer.train()
    event = guard.divergence
    assert event is not None and (event["step"], event["first_checked_step"], event["restored_step"]) == (5, 4, 2)
    assert guard.weights_validated and output.metrics["rksp/diverged"] == 1.0  # before train() reports
    assert any(h.get("rksp/diverged_step") == 5 for h in trainer.state.log_history)

    # a sane run stopped inside a window: no event
    guard = _guard(check_every_n_steps=3)
    output = Trainer(model=tiny_gpt2(), args=_args(tmp_path / "sane", learning_rate=1e-3, save_strategy="no"),
                     train_dataset=data, callbacks=[StopAfter(5), guard]).train()
    assert guard.divergence is None and output.metrics["rksp/diverged"] == 0.0
    assert "rksp/diverged_step" not in output.metrics  # only a stopped run says which step stopped it


@pytest.mark.parametrize("every, expected", [(1, (6, 6)), (4, (8, 5))])
def test_a_transient_spike_between_checks_is_not_missed(tmp_path, every, expected):
    data = TokenDataset(n=128)
    guard = _guard(check_every_n_steps=every)
    Trainer(model=tiny_gpt2(), args=_args(tmp_path, learning_rate=1e-3, max_steps=8, save_strategy="no"),
            train_dataset=data, callbacks=[logit_spike(6), guard]).train()
    event = guard.divergence
    assert event is not None and (event["step"], event["first_checked_step"]) == expected
    assert event["loss"] > 50 and event["first_bad_layer"] is None


class ShardAfterStep(TrainerCallback):
    """Makes the guard see sharded parameters from step `step` on, as FSDP2 swaps in DTensor shards after train begin:
    the parameters read as sharded and the first parameter object differs from the one the guard listed."""

    def __init__(self, guard, step, monkeypatch):
        self.guard, self.step, self.monkeypatch = guard, step, monkeypatch

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.monkeypatch.setattr(safety_net, "is_sharded", lambda params: True)
            self.guard._params_first = None  # the listed parameters are no longer the model's


def test_auto_rollback_source_falls_back_to_memory_when_the_parameters_become_sharded(tmp_path, monkeypatch, caplog):
    # little free memory and a full checkpoint every step: "auto" restores from checkpoints, until the parameters are
    # sharded (FSDP2 after train begin), which a checkpoint restore does not support; the rollback then comes from
    # the in-memory copy the guard keeps from then on, and the run finishes
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 10**3})())
    guard = _guard(on_divergence="rollback")
    trainer = Trainer(model=tiny_gpt2(), args=_args(tmp_path, max_steps=6), train_dataset=TokenDataset(n=128),
                      callbacks=[guard, ShardAfterStep(guard, 2, monkeypatch)])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "the parameters are sharded (FSDP) now" in caplog.text
    assert guard._from_checkpoint is False
    assert guard.rollbacks >= 1 and guard.divergence is None
    assert guard.events[0]["restored_step"] == 2  # the copy validated by step 3's loss, kept in memory
    assert all(math.isfinite(float(p.detach().sum())) for p in trainer.model.parameters())
