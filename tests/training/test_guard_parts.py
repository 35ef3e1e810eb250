"""`GradNormTap`: the pre-clip gradient norm is read once per backward pass and equals the norm the optimizer step
would have seen before clipping, with and without gradient accumulation."""

from __future__ import annotations

import pytest
import torch

from hf_koopman.training.guard import GradNormTap, StateSnapshot


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_pre_clip_norm_is_read_before_clipping(accumulation):
    model = _model()
    params = list(model.parameters())
    tap = GradNormTap(params, pre_clip=True, model=model)
    x = torch.randn(5, 8)
    for step in range(2):
        model.zero_grad()
        tap.reset()
        for _ in range(accumulation):
            model(x * (step + 1)).square().sum().backward()
        expected = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)  # what the Trainer does before on_pre_optimizer_step
        assert float(expected) > 1e-2
        assert float(tap.squared_norm(params).sqrt()) == pytest.approx(float(expected), rel=1e-6)
    tap.remove()
    model.zero_grad()
    model(x).square().sum().backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
    tap.reset()
    # without hooks the norm is read from the gradients as they are now: the clipped ones
    assert float(tap.squared_norm(params).sqrt()) == pytest.approx(1e-3, rel=1e-3)


def test_pre_clip_norm_lives_in_one_buffer_across_steps():
    # the value read at the end of backward is copied into a buffer allocated once (no new tensor alive per step)
    model = _model()
    params = list(model.parameters())
    tap = GradNormTap(params, pre_clip=True, model=model)
    seen = []
    for step in range(3):
        model.zero_grad()
        tap.reset()
        model(torch.randn(5, 8) * (step + 1)).square().sum().backward()
        value = tap.squared_norm(params)
        expected = torch.nn.utils.get_total_norm([p.grad for p in params]) ** 2
        assert float(value) == pytest.approx(float(expected), rel=1e-5)
        seen.append(value)
    assert seen[0] is seen[1] is seen[2]
    tap.remove()


def test_without_pre_clip_reads_current_gradients_and_none_without_gradients():
    model = _model()
    params = list(model.parameters())
    tap = GradNormTap(params, pre_clip=False)
    assert tap.squared_norm(params) is None
    model(torch.randn(5, 8)).sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert float(tap.squared_norm(params).sqrt()) == pytest.approx(float(expected), rel=1e-6)


def test_activation_watch_flags_the_first_block_with_a_non_finite_output():
    from types import SimpleNamespace

    from hf_koopman.training.guard import ActivationWatch

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = 1.0

        def forward(self, x):
            return x * self.factor

    blocks = [Scale() for _ in range(3)]
    model = torch.nn.Sequential(*blocks).train()
    watch = ActivationWatch([SimpleNamespace(name=f"b{i}", module=b) for i, b in enumerate(blocks)])
    x = torch.randn(4, 8, requires_grad=True)
    assert watch.first_bad_index() is None  # nothing seen yet
    model(x)
    assert int(watch.first_bad_index()) == 3  # all finite: "none" is len(blocks)
    blocks[1].factor = float("nan")  # a later micro-batch goes bad in block 1 (and hence block 2)
    model(x)
    assert int(watch.first_bad_index()) == 1
    watch.reset()
    blocks[1].factor = 1e38  # finite elements whose float32 sum overflows: flagged as well
    model(x)
    assert int(watch.first_bad_index()) == 1
    watch.reset()
    blocks[1].factor = float("inf")
    with torch.no_grad():  # evaluation passes are not watched
        model(x)
    assert watch.first_bad_index() is None
    watch.remove()


def test_activation_watch_sums_accumulate_in_place_and_restart_after_reset():
    # the per-block sums live in buffers allocated once; reset() restarts them rather than adding to the old values
    from types import SimpleNamespace

    from hf_koopman.training.guard import ActivationWatch

    blocks = [torch.nn.Identity() for _ in range(2)]
    model = torch.nn.Sequential(*blocks).train()
    watch = ActivationWatch([SimpleNamespace(name=f"b{i}", module=b) for i, b in enumerate(blocks)])
    x = torch.ones(3, 4, requires_grad=True)
    model(x)
    model(2 * x)  # a second micro-batch of the same step adds to the sums
    assert float(watch.total()) == pytest.approx(2 * (12 + 24))
    buffers = list(watch._sums)
    watch.reset()
    assert watch.total() is None
    model(3 * x)
    assert float(watch.total()) == pytest.approx(2 * 36)  # restarted, not 72 + 72
    assert all(a is b for a, b in zip(watch._sums, buffers))  # the same buffers, no new tensor per step
    total = watch.total()
    watch.reset()
    model(x)
    assert float(total) == pytest.approx(72)  # a total already taken does not change with later steps
    watch.remove()


@pytest.mark.parametrize("head_has_parameters", [True, False])
@pytest.mark.parametrize("reentrant", [True, False])
def test_pre_clip_norm_with_gradient_checkpointing(reentrant, head_has_parameters):
    # reentrant checkpointing runs nested backward passes: the norm must still cover every parameter's gradient
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
    head = torch.nn.Linear(8, 2).requires_grad_(head_has_parameters)  # without: the first hook fires in a nested pass
    params = [p for p in [*blocks.parameters(), *head.parameters()] if p.requires_grad]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head = blocks, head

        def forward(self, h):
            for block in self.blocks:
                h = checkpoint(lambda t, b=block: torch.tanh(b(t)), h, use_reentrant=reentrant)
            return self.head(h)

    net = Net()
    tap = GradNormTap(params, pre_clip=True, model=net)
    net(torch.randn(4, 8, requires_grad=True)).square().sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-4)
    assert float(tap.squared_norm(params).sqrt()) == pytest.approx(float(expected), rel=1e-6)


def test_backward_outside_the_model_outputs_falls_back_with_a_warning(caplog):
    # a loss that does not flow through the model's outputs: the clipped norm is read instead, and the user is told
    model = _model()
    params = list(model.parameters())
    tap = GradNormTap(params, pre_clip=True, model=model)
    with torch.no_grad():
        model(torch.randn(5, 8))  # no training forward: nothing hooked
    params[0].square().sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    with caplog.at_level("WARNING"):
        got = tap.squared_norm(params).sqrt()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert "did not flow through the model's outputs" in caplog.text


def test_output_hooks_read_the_norm_of_a_model_returning_a_loss_dict():
    # a transformers-style output (a dict with the loss and the logits): the norm is read once per backward pass
    class Lm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            logits = self.net(x)
            return {"loss": logits.square().mean(), "logits": logits, "aux": None}

    lm = Lm()
    params = list(lm.parameters())
    tap = GradNormTap(params, pre_clip=True, model=lm)
    out = lm(torch.randn(5, 8))
    (out["loss"] + 0.0 * out["logits"].sum()).backward()  # both hooked outputs are reached: one read
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grad_norm_(params, max_norm=1e-4)
    assert float(tap.squared_norm(params).sqrt()) == pytest.approx(float(expected), rel=1e-6)


def test_state_snapshot_clear_frees_the_copies_and_a_new_capture_works():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    snap = StateSnapshot()
    snap.capture(list(model.parameters()), optimizer, step=1)
    assert not snap.empty and snap.nbytes() > 0
    snap.clear()
    assert snap.empty and snap.nbytes() == 0
    with pytest.raises(RuntimeError, match="no snapshot"):
        snap.restore(list(model.parameters()), optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    snap.capture(list(model.parameters()), optimizer, step=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snap.restore(list(model.parameters()), optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class _GroupStateSGD(torch.optim.SGD):
    """An optimizer that keeps state of its own in its parameter groups, as Prodigy keeps `d` and `k`."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group.update(d=0.01, k=0)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["d"], group["k"] = group["d"] * 10, group["k"] + 1
        return super().step(closure)


@pytest.mark.parametrize("source", ["snapshot", "checkpoint"])
def test_a_restore_puts_the_optimizers_group_state_back_and_keeps_the_scheduled_rate(tmp_path, source):
    """What goes back is the optimizer's own state, in its groups too (Prodigy's `d`, `k`); what a scheduler or a
    callback sets (`lr`, OneCycle's `momentum` / `betas`, weight decay) keeps its current value: the schedule carries
    on."""
    from safetensors.torch import save_file

    from hf_koopman.training.guard import load_checkpoint_state

    model = torch.nn.Linear(4, 3)
    optimizer = _GroupStateSGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    snap = StateSnapshot()
    snap.capture(list(model.parameters()), optimizer, step=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    saved = {k: v for k, v in optimizer.param_groups[0].items() if k in ("d", "k")}
    for _ in range(3):  # the steps that diverged: the group state grows, and the schedule moves the rate
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 0.05
    if source == "snapshot":
        snap.restore(list(model.parameters()), optimizer)
    else:
        load_checkpoint_state(model, optimizer, tmp_path)
    group = optimizer.param_groups[0]
    assert {k: group[k] for k in ("d", "k")} == pytest.approx(saved) and group["lr"] == 0.05


class _LossModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, num_items_in_batch=None):
        return {"loss": self.w * x.mean()}


def test_loss_tap_accumulates_in_buffers_and_restarts_after_reset():
    from hf_koopman.training.guard import LossTap

    model = _LossModel().train()
    tap = LossTap(model)
    model(torch.full((4,), 2.0))
    model(torch.full((4,), 4.0))  # two averaged micro-batches: the step loss is their mean
    assert float(tap.step_loss()) == pytest.approx(3.0)
    buffer = tap._means
    taken = tap.step_loss()
    tap.reset()
    assert tap.step_loss() is None
    model(torch.full((4,), 5.0))
    assert float(tap.step_loss()) == pytest.approx(5.0) and tap._means is buffer  # restarted in the same buffer
    assert float(taken) == pytest.approx(3.0)  # a loss already taken does not change with later steps
    tap.reset()
    model(torch.full((4,), 1.0), num_items_in_batch=8)  # shares of the step's loss are summed
    model(torch.full((4,), 2.0), num_items_in_batch=8)
    assert float(tap.step_loss()) == pytest.approx(3.0)
    with torch.no_grad():
        model(torch.full((4,), 100.0))  # forwards without gradients (evaluation, profiling) are ignored
    assert float(tap.step_loss()) == pytest.approx(3.0)
