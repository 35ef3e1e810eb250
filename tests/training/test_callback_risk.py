"""RKSPCallback logs the calibrated risk with its range flag, and says when the run lies outside the fitted range."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import TokenDataset, cpu_training_args, info_logs, tiny_gpt2
from transformers import Trainer, TrainingArguments

from hf_koopman.risk import RiskEstimator
from hf_koopman.training import RKSPCallback


def test_init_logs_risk_out_of_range_for_a_learning_rate_below_the_fitted_range(tmp_path, caplog):
    low, _ = RiskEstimator.default().learning_rate_range
    lr = low / 100  # two decades below the shipped estimator's training runs
    callback = RKSPCallback(num_samples=128, save_artifacts=False)  # full spectrum: an informative verdict
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=lr)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with info_logs(caplog):  # below the fitted rates the risk line is information, not an alarm
        trainer.train()
    init = trainer.state.log_history[0]
    # the logged risk is the shipped estimator's probability for this profile at the run's learning rate
    expected = RiskEstimator.default().predict_proba(callback.profile, learning_rate=lr)
    assert 0.0 < expected < 1.0 and init["rksp/risk"] == pytest.approx(expected, rel=1e-6)
    assert init["rksp/risk_out_of_range"] == 1.0
    assert "outside the fitted range: learning_rate" in caplog.text and "2 decades below" in caplog.text
    # the risk line names the verdict it is contrasted with (the verdict's own line is at INFO unless high risk)
    assert f"(the verdict, {callback.init_verdict.upper()}, reads the spectrum alone)" in caplog.text


def test_an_optimizer_the_estimator_was_not_fitted_on_is_outside_its_range(tmp_path, caplog):
    """The shipped estimator's runs trained with AdamW: the same model and learning rate with optim="sgd" log
    rksp/risk_out_of_range = 1 and a warning naming the optimizer; every AdamW implementation stays inside."""
    low, high = RiskEstimator.default().learning_rate_range
    lr = (low * high) ** 0.5  # inside the fitted learning rates
    flags = {}
    for optim in ("adamw_torch", "sgd"):
        callback = RKSPCallback(num_samples=128, save_artifacts=False, guard=False)
        args = cpu_training_args(tmp_path / optim, TrainingArguments, max_steps=1, learning_rate=lr, optim=optim)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
        with caplog.at_level(logging.INFO, logger="hf_koopman"):
            trainer.train()
        assert callback.profile.meta["optimizer"] == optim
        outside = {i.key for i in callback.profile.risk_assessment().outside}
        flags[optim] = ("optimizer" in outside, trainer.state.log_history[0].get("rksp/risk_out_of_range"))
    assert flags["adamw_torch"][0] is False and flags["sgd"] == (True, 1.0)
    assert "optimizer = 'sgd' (fitted on adamw)" in caplog.text


def test_zero_learning_rate_profiles_without_a_risk_and_a_short_probe_keeps_the_request(tmp_path, caplog):
    from hf_koopman.risk import tokens_short

    callback = RKSPCallback(num_samples=4096, rank=8, save_artifacts=False)  # more than the probe batch holds
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=0.0)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with info_logs(caplog):
        trainer.train()  # profile() rejects learning_rate=0; the callback passes none instead
    assert "learning_rate" not in callback.profile.meta and "rksp/risk" not in trainer.state.log_history[0]
    assert "Recommended: none for this run: learning_rate=0 plans no update" in caplog.text
    meta = callback.profile.meta
    assert meta["num_samples_requested"] == 4096 and tokens_short(meta) == meta["tokens_seen"] < 4096


def test_scalars_count_the_layers_the_aggregates_leave_out():
    from hf_koopman.profiling import profile
    from hf_koopman.testing_utils import tiny_model
    from hf_koopman.training.callback import RKSPCallback

    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    short = {"input_ids": ids, "decoder_input_ids": ids[:, :4]}  # the decoder sees 16 token states for d = 32
    result = profile(tiny_model("t5"), short, num_samples=256)
    scalars = RKSPCallback._scalars(result)
    assert scalars["rksp/layers_left_out"] == 2.0 and scalars["rksp/num_layers"] == 2.0
    assert scalars["rksp/score_layers"] == float(len(result.informative_layers)) <= 2.0
    assert scalars["rksp/near_unit_mass_mean"] == pytest.approx(scalars["rksp/score"])
    uniform = RKSPCallback._scalars(profile(tiny_model("llama"), num_samples=128))
    assert uniform["rksp/layers_left_out"] == 0.0


def test_monitoring_marks_trained_weights_and_reads_the_backed_off_learning_rate(tmp_path, monkeypatch):
    callback = RKSPCallback(num_samples=128, monitor_num_samples=128, every_n_steps=1, save_artifacts=False)
    calls = []
    run = callback._run_profile

    def spy(model, batch, num_samples, learning_rate=None, progress=False, **kwargs):
        result = run(model, batch, num_samples, learning_rate, progress, **kwargs)
        calls.append((learning_rate, result))
        callback.lr_scale = 0.5  # as a rollback's back-off leaves it after the init profile
        return result

    monkeypatch.setattr(callback, "_run_profile", spy)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=2, learning_rate=0.01)
    Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert [lr for lr, _ in calls] == [0.01, 0.005, 0.005]
    flagged = [[i.key for i in result.risk_assessment().outside] for _, result in calls]
    assert "weights" not in flagged[0]  # the initialisation
    assert all("weights" in keys for keys in flagged[1:])  # trained weights: outside the fitted runs
    assert [result.meta.get("weights") for _, result in calls] == ["init", "trained", "trained"]


@pytest.mark.parametrize(("probability", "level"), [(5e-4, logging.INFO), (0.4, logging.WARNING)])
def test_an_in_range_probability_decides_the_init_advice_and_its_alarm(tmp_path, caplog, in_range_estimator,
                                                                       probability, level):
    in_range_estimator(probability)
    callback = RKSPCallback(num_samples=128, save_artifacts=False)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=3e-3)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with info_logs(caplog):
        trainer.train()
    line = next(r for r in caplog.records if r.getMessage().startswith("RKSP verdict at initialisation"))
    assert line.levelno == level and "\n  Recommended: At learning rate 0.003 the calibrated" in line.getMessage()
    assert line.getMessage().count("\n") == 2 and "\n  Why: " in line.getMessage()  # verdict, reason, advice



def test_a_rank_r_callback_warns_once_and_recommends_the_full_spectrum(tmp_path, caplog):
    from hf_koopman.risk import RANK_ADVICE

    with caplog.at_level(logging.WARNING, logger="hf_koopman"):
        callback = RKSPCallback(num_samples=128, rank=8, save_artifacts=False)
        args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=0.01)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
        trainer.train()
    assert "RKSPCallback(rank=8): a rank-8 profile gets no threshold verdict" in caplog.text
    assert callback.init_verdict == "uninformative"
    from hf_koopman.risk import recommendation

    assert recommendation(callback.init_verdict, None, rank=8) == RANK_ADVICE


@pytest.mark.parametrize(("band", "verdict", "level"), [((0.0, 1.0), "moderate", logging.INFO),
                                                         ((0.0, 0.0), "high risk", logging.WARNING)])
def test_without_a_calibrated_probability_only_a_high_risk_verdict_is_a_warning(tmp_path, caplog, monkeypatch,
                                                                               band, verdict, level):
    # a learning rate far below the estimator's fitted range: the advice and alarm follow the verdict, and the
    # paper's moderate band (between its two thresholds) is advice, not an alarm
    import dataclasses

    low, _ = RiskEstimator.default().learning_rate_range
    callback = RKSPCallback(num_samples=128, save_artifacts=False)
    run = callback._run_profile

    def banded(*args, **kwargs):
        result = run(*args, **kwargs)
        result.rule = dataclasses.replace(result.rule, safe_below=band[0], high_risk_above=band[1])
        return result

    monkeypatch.setattr(callback, "_run_profile", banded)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=low / 100)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with info_logs(caplog):
        trainer.train()
    assert callback.init_verdict == verdict and callback.profile.risk_assessment().out_of_range
    line = next(r for r in caplog.records if r.getMessage().startswith("RKSP verdict at initialisation"))
    assert line.levelno == level and verdict.upper() in line.getMessage()


@pytest.mark.parametrize(("factor", "level"), [(1e-2, logging.INFO), (1e2, logging.WARNING)])
def test_a_learning_rate_below_the_fitted_range_is_information_above_it_a_warning(tmp_path, caplog, factor, level):
    # below every fitted rate (a fine-tune's 5e-5) the shown probability is the lowest fitted rate's, a bound on the
    # safe side; above them it is an extrapolation towards divergence
    low, high = RiskEstimator.default().learning_rate_range
    lr = low * factor if factor < 1 else high * factor
    callback = RKSPCallback(num_samples=128, save_artifacts=False)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=lr)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback])
    with info_logs(caplog):
        trainer.train()
    assessment = callback.profile.risk_assessment()
    assert assessment.out_of_range and [i.key for i in assessment.outside] == ["learning_rate"]
    line = next(r for r in caplog.records if r.getMessage().startswith("RKSP calibrated risk at this learning rate"))
    assert line.levelno == level and "outside the fitted range" in line.getMessage()


def test_an_optimizer_passed_as_an_object_is_the_one_checked(tmp_path):
    """`Trainer(optimizers=(SGD, None))` trains with SGD although `args.optim` still names AdamW: the range check
    reads the optimizer the Trainer hands the callback (accelerate's wrapper unwrapped), not the argument."""
    low, high = RiskEstimator.default().learning_rate_range
    lr = (low * high) ** 0.5
    seen = {}
    for make in (torch.optim.SGD, torch.optim.AdamW):
        model = tiny_gpt2()
        callback = RKSPCallback(num_samples=128, save_artifacts=False, guard=False)
        args = cpu_training_args(tmp_path / make.__name__, TrainingArguments, max_steps=1, learning_rate=lr)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback],
                          optimizers=(make(model.parameters(), lr=lr), None))
        trainer.train()
        outside = {i.key for i in callback.profile.risk_assessment().outside}
        seen[make.__name__] = (callback.profile.meta["optimizer"], "optimizer" in outside,
                               trainer.state.log_history[0].get("rksp/risk_out_of_range"))
    assert seen["SGD"] == ("SGD", True, 1.0)
    # an AdamW object is the class args.optim builds, so the argument's name stands (and is inside the range)
    assert seen["AdamW"][:2] == (str(TrainingArguments(output_dir=str(tmp_path)).optim.value), False)


def test_optimizer_families_of_names_and_classes():
    from hf_koopman.risk import optimizer_family

    for name in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "AdamW", "AdamW8bit", "PagedAdamW32bit"):
        assert optimizer_family(name) == "adamw", name
    for name, family in (("SGD", "sgd"), ("Adam", "adam"), ("schedule_free_adamw", "schedule_free_adamw"),
                         ("AdamWScheduleFree", "adamwschedulefree")):
        assert optimizer_family(name) == family


def test_the_optimizer_is_read_through_wrappers_that_are_not_optimizers(tmp_path, monkeypatch):
    """DeepSpeed's optimizers are plain objects holding the torch optimizer as `.optimizer` (under accelerate's
    wrapper): the check reads the torch optimizer inside. The class lookup runs without the model (the layer-wise
    optimizers would build a second set from it)."""
    from transformers import Trainer as HfTrainer

    from hf_koopman.training.callback import _optimizer_name

    class ZeroLike:  # DeepSpeedZeroOptimizer: not a torch Optimizer
        def __init__(self, inner):
            self.optimizer = inner

    class Outer(torch.optim.Optimizer):  # accelerate's DeepSpeedOptimizerWrapper
        def __init__(self, inner):
            self.optimizer = inner

    args = TrainingArguments(output_dir=str(tmp_path))
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert _optimizer_name(args, Outer(ZeroLike(torch.optim.AdamW(params)))) == str(args.optim.value)
    assert _optimizer_name(args, Outer(ZeroLike(torch.optim.SGD(params, lr=0.1)))) == "SGD"
    assert _optimizer_name(args, None) == str(args.optim.value)
    seen = []
    lookup = HfTrainer.get_optimizer_cls_and_kwargs
    monkeypatch.setattr(HfTrainer, "get_optimizer_cls_and_kwargs",
                        staticmethod(lambda a, model=None: seen.append(model) or lookup(a, model)))
    _optimizer_name(args, torch.optim.AdamW(params))
    assert seen == [None]


def test_an_uninformative_profile_neither_advises_nor_alarms_from_its_probability(tmp_path, caplog,
                                                                                 in_range_estimator):
    """An in-range 40 % from a spectrum the verdict calls uninformative (16 token states for width 32): the advice is
    the uninformative verdict's, there is no alarm, and the probability line says it is no reading of the model."""
    from hf_koopman.risk import ADVICE

    in_range_estimator(0.4)
    callback = RKSPCallback(num_samples=16, save_artifacts=False, guard=False)
    args = cpu_training_args(tmp_path, TrainingArguments, max_steps=1, learning_rate=3e-3)
    with info_logs(caplog):
        Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(), callbacks=[callback]).train()
    assert callback.init_verdict == "uninformative"
    verdict_line = next(r for r in caplog.records if r.getMessage().startswith("RKSP verdict"))
    assert verdict_line.levelno == logging.INFO
    assert f"Recommended: {ADVICE['uninformative']}" in verdict_line.getMessage()
    assert "computed from an uninformative spectrum" in caplog.text and "lower the learning rate" not in caplog.text
