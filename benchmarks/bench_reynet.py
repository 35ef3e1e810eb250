"""ReyNet cost, measured side by side in one run.

1. Full Reynolds operator (literal sum over n! permutations) vs the reductive operator over the graph design
   (n(n−1) ordered pairs) at n = 4..8: time per call, speed-up and max |difference| (float64).
2. One ReyNet layer vs one IEGN layer (Maron et al.'s 15-op basis) at n = 32, 64, 128: forward+backward CPU time
   and activation memory saved for backward (bytes of the tensors autograd keeps, counted with
   `torch.autograd.graph.saved_tensors_hooks`, plus the inputs a checkpointed layer keeps for its recomputation).
   Contenders: the ReyNet layer of the target, φ: 4C -> C -> 2C' with C' = C (the widths of an IEGN layer
   C -> C), the same layer with activation checkpointing, the block shape of the graph models (φ hidden 2C plus a
   channel MLP), the depthwise φ of the paper's code, and three IEGN implementations: the materialised 15-op basis,
   the factorised channel-first layer, and the channel-last GEMM path our IEGN model uses (the strongest baseline).
   Every layer gets the same values, contiguous in its own layout.
3. With `--data-dir`: CPU seconds of one training epoch per TU dataset for ReyNet, IEGN as the model runs it
   (channel-last) and IEGN through the factorised channel-first layer.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_reynet [--quick] [--data-dir DIR] [--out results/reynet_benchmark.txt]

Timings are CPU seconds of this process (`time.process_time`, run with OMP_NUM_THREADS=1 so CPU time is the work of
one thread), minimum over repeats: on a shared machine wall-clock time also counts the other processes' time slices,
CPU time much less so. The load average is printed with the report.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn

from hf_koopman.models.reynet import IEGNLinear, ReyNetConfig, full_reynolds, reductive_reynolds
from hf_koopman.models.reynet.modeling_reynet import ReyNetReynoldsBlock, _pair_masks


def _time(fn, repeats: int, clock=time.process_time) -> float:
    """Minimum seconds of `fn()` over `repeats` calls: CPU seconds by default; pass `time.perf_counter` for GPU work,
    whose time the CPU clock does not see (the GPU steps synchronise before they return)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def bench_operator(sizes, lines: list[str]) -> None:
    torch.manual_seed(0)
    C, C_out = 2, 2
    phi = nn.Sequential(nn.Linear(4 * C, 16), nn.ReLU(), nn.Linear(16, 2 * C_out)).double()
    lines.append("## full Reynolds (n! permutations) vs reductive (n(n-1) pairs), B=4, C=2, float64")
    lines.append(f"{'n':>3} {'n!':>7} {'full [ms]':>11} {'reductive [ms]':>15} {'speed-up':>10} {'max|diff|':>10}")
    with torch.no_grad():
        for n in sizes:
            X = torch.randn(4, C, n, n, dtype=torch.float64)
            full = full_reynolds(phi, X)
            red = reductive_reynolds(phi, X)
            diff = (full - red).abs().max().item()
            t_full = _time(lambda: full_reynolds(phi, X), 2 if n >= 8 else 3)
            t_red = _time(lambda: reductive_reynolds(phi, X), 20)
            fact = 1
            for k in range(2, n + 1):
                fact *= k
            lines.append(
                f"{n:>3} {fact:>7} {1e3 * t_full:>11.2f} {1e3 * t_red:>15.3f} {t_full / t_red:>9.0f}x {diff:>10.1e}"
            )


class _IEGNLayer(nn.Module):
    channels_last = False

    def __init__(self, c: int, factorized: bool) -> None:
        super().__init__()
        self.linear = IEGNLinear(c, c, factorized=factorized)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(X))


class _IEGNLayerChannelsLast(nn.Module):
    """The path `ReyNetIEGNBlock` uses: channel-last GEMMs on a contiguous `(B, n, n, C)` input, as in the model."""

    channels_last = True

    def __init__(self, c: int) -> None:
        super().__init__()
        self.linear = IEGNLinear(c, c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear.forward_channels_last(h))


class _ReyNetLayer(nn.Module):
    """One ReyNet block on a contiguous channel-last `(B, n, n, C)` input (the model's layout), no padding."""

    channels_last = True

    def __init__(self, c: int, phi_mode: str, hidden: int, channel_mlp: bool, checkpointed: bool = False) -> None:
        super().__init__()
        cfg = ReyNetConfig(in_channels=c, phi_mode=phi_mode, phi_hidden_sizes=[hidden], reynolds_channels=c,
                           channel_hidden_sizes=[c] if channel_mlp else [], skip_connection=False)
        self.block = ReyNetReynoldsBlock(cfg, c)
        if checkpointed:  # what `model.activation_checkpointing_enable()` does to every block
            from functools import partial

            from torch.utils.checkpoint import checkpoint

            self.block.gradient_checkpointing = True
            self.block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        self.checkpointed = checkpointed
        self.kept_inputs: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, n = h.shape[:2]
        _, pair, count = _pair_masks(None, B, n, h.device)
        # a checkpointed layer keeps its inputs (not through the saved-tensor hooks): count them as saved
        self.kept_inputs = [h, pair, count] if self.checkpointed else []
        # node=None: no padding, as `ReyNetModel` calls its blocks for a batch of equal-size graphs (the IEGN
        # contenders get no mask either)
        return self.block(h, pair, None, count)


def _saved_bytes(layer: nn.Module, X: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(X).sum()
    for t in getattr(layer, "kept_inputs", []):
        pack(t)
    return sum(seen.values())


# the layer of the target (matched widths: φ 4C -> C -> 2C', C' = C, like IEGN's C -> C), then other ReyNet shapes
_TARGET = "ReyNet layer (φ h=C)"
_IEGN_BEST = "IEGN (channel-last, in model)"


def bench_layers(
    sizes, lines: list[str], channels: int = 16, batch: int = 2, rounds: int = 5, device: str | None = None
) -> bool:
    """Returns whether the target layer is not slower and lighter than every IEGN implementation at every n.

    On the CPU the time is process CPU time; on a GPU it is wall-clock time of a synchronised step."""
    torch.manual_seed(0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    c = channels
    contenders = {
        _TARGET: _ReyNetLayer(c, "joint", c, channel_mlp=False),
        "ReyNet layer (φ h=C), checkpointed": _ReyNetLayer(c, "joint", c, channel_mlp=False, checkpointed=True),
        "ReyNet layer (φ h=C/2)": _ReyNetLayer(c, "joint", c // 2, channel_mlp=False),
        "ReyNet graph-model block (φ h=2C + channel MLP)": _ReyNetLayer(c, "joint", 2 * c, channel_mlp=True),
        "ReyNet depthwise φ (paper's φ shape, h=16)": _ReyNetLayer(c, "depthwise", 16, channel_mlp=False),
        "IEGN (15 ops materialised)": _IEGNLayer(c, factorized=False),
        "IEGN (factorised, channel-first)": _IEGNLayer(c, factorized=True),
        _IEGN_BEST: _IEGNLayerChannelsLast(c),
    }
    contenders["ReyNet layer (φ h=C), checkpointed"].load_state_dict(contenders[_TARGET].state_dict())
    for layer in contenders.values():
        layer.to(device)
    names = list(contenders)
    rey_names, iegn_names = names[:5], names[5:]
    lines.append("")
    lines.append(f"## one equivariant layer, C_in = C_out = {c}, batch {batch}, forward+backward, {device}")
    lines.append("Inputs hold the same values, contiguous in each layer's own layout: (B, n, n, C) for the channel-last "
                 "layers (as the models run them), (B, C, n, n) for the channel-first IEGN layers. Time: minimum over "
                 f"{rounds} interleaved rounds.")
    for name, m in contenders.items():
        lines.append(f"  {name}: {sum(p.numel() for p in m.parameters())} parameters")
    header = f"{'n':>4} " + " ".join(f"{name[:28]:>28}" for name in names)
    time_rows, mem_rows, ratios = [], [], []
    verdict = {rey: True for rey in rey_names}
    for n in sizes:
        X = torch.randn(batch, n, n, c, device=device)
        inputs = {False: X.permute(0, 3, 1, 2).contiguous().requires_grad_(),
                  True: X.clone().requires_grad_()}
        reference = contenders[_TARGET](inputs[True])
        if not torch.allclose(contenders[names[1]](inputs[True]), reference, rtol=1e-5, atol=1e-6):
            raise RuntimeError("the checkpointed layer does not reproduce the ReyNet layer's output")
        times = {name: float("inf") for name in names}
        steps = {}
        for name, layer in contenders.items():
            inp = inputs[layer.channels_last]

            def step(layer=layer, inp=inp):
                layer.zero_grad(set_to_none=True)
                layer(inp).square().mean().backward()
                if device == "cuda":
                    torch.cuda.synchronize()

            step()  # warm-up
            steps[name] = step
        for _ in range(rounds):  # interleaved: a load burst hits every contender alike
            for name in names:
                times[name] = min(times[name], _time(steps[name], 1, clock))
        mems = {name: _saved_bytes(layer, inputs[layer.channels_last]) for name, layer in contenders.items()}
        time_rows.append(f"{n:>4} " + " ".join(f"{1e3 * times[name]:>28.2f}" for name in names))
        mem_rows.append(f"{n:>4} " + " ".join(f"{mems[name] / 2**20:>28.2f}" for name in names))
        for rey in rey_names:
            ratios.append(f"{n:>4} {rey:<50}" + "".join(
                f" | vs {iegn[6:-1]}: time {times[iegn] / times[rey]:.2f}x, memory {mems[iegn] / mems[rey]:.2f}x"
                for iegn in iegn_names))
        for rey in rey_names:
            verdict[rey] &= all(times[i] >= times[rey] and mems[i] > mems[rey] for i in iegn_names)
    lines.append("time [ms]" + (" (wall clock, synchronised)" if clock is time.perf_counter else " (CPU time)"))
    lines.append(header)
    lines.extend(time_rows)
    lines.append("activation memory saved for backward [MiB]")
    lines.append(header)
    lines.extend(mem_rows)
    lines.append("IEGN / ReyNet ratios (> 1: ReyNet is faster / uses less memory)")
    lines.extend(ratios)
    lines.append("target (not slower and lighter than every IEGN implementation at every n), per ReyNet layer shape:")
    for rey in rey_names:
        lines.append(f"  {rey}: {'met' if verdict[rey] else 'NOT met'}")
    return verdict[_TARGET]


def bench_epoch(data_dir: str, name: str, lines: list[str], batch_size: int = 16, seed: int = 1234) -> None:
    """CPU seconds of one training epoch (fold 0 of the seeded 10-fold split, the CV script's batches and models) for
    ReyNet, IEGN as the model runs it (channel-last GEMMs) and IEGN through the channel-first factorised layer, side by
    side."""
    import types

    from research.experiments import reynet as rx
    from research.data.graphs import GraphDataset, load_gin_graphs, stratified_kfold
    from hf_koopman.models.reynet.modeling_reynet import _zero_padding

    graphs, num_classes, num_labels = load_gin_graphs(data_dir, name)
    ds = GraphDataset(graphs, num_labels)
    train_idx, _ = stratified_kfold(ds.labels, 10, seed)[0]
    protocol = rx.GraphProtocol(seed=seed)

    def channel_first(block, h, pair, node, count):
        if node is None:
            node = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        y = block.act(block.linear(h.permute(0, 3, 1, 2), node)).permute(0, 2, 3, 1)
        return _zero_padding(y, node)

    results = {}
    for label, kind, patch in (("ReyNet", "reynet", False), ("IEGN (channel-last)", "iegn", False),
                               ("IEGN (channel-first)", "iegn", True)):
        torch.manual_seed(seed)
        model = rx.graph_model(kind, num_labels + 1, num_classes, protocol)
        if patch:
            for block in model.reynet.blocks:
                block.forward = types.MethodType(channel_first, block)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        t0 = time.process_time()
        rx._train_epoch(model, opt, ds, train_idx, batch_size, torch.Generator().manual_seed(seed), label)
        results[label] = time.process_time() - t0
    lines.append("")
    lines.append(f"## one training epoch on {name} (fold 0, {len(train_idx)} graphs, batch {batch_size}), CPU seconds")
    lines.append("  ".join(f"{k}: {v:.2f} s" for k, v in results.items()))
    first, last = results["IEGN (channel-first)"], results["IEGN (channel-last)"]
    lines.append(f"  IEGN channel-first / channel-last: {first / last:.2f}x   IEGN (channel-last) / ReyNet: "
                 f"{last / results['ReyNet']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--data-dir", default=None, help="with graphs/<NAME>/: also time one training epoch per dataset")
    p.add_argument("--datasets", default="MUTAG,PROTEINS,NCI109")
    p.add_argument("--layers-only", action="store_true", help="only the layer comparison (e.g. on a GPU machine)")
    p.add_argument("--layer-batch", default="2", help="batch sizes of the layer comparison, e.g. '2,16'")
    p.add_argument("--device", default=None, help="layer comparison device (default: cuda when available)")
    args = p.parse_args()
    lines: list[str] = [f"# load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
                         f"on {os.cpu_count()} CPUs; torch threads {torch.get_num_threads()}"]
    if not args.layers_only:
        bench_operator([4, 5, 6] if args.quick else [4, 5, 6, 7, 8], lines)
    for batch in (int(b) for b in args.layer_batch.split(",") if b):
        bench_layers([16, 32] if args.quick else [32, 64, 128], lines, batch=batch, device=args.device)
    if args.data_dir and not args.layers_only:
        for name in (["MUTAG"] if args.quick else args.datasets.split(",")):
            bench_epoch(args.data_dir, name, lines)
    lines.append(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
