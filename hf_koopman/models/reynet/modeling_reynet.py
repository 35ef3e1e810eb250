"""ReyNet: invariant and equivariant Reynolds networks on graphs / 2-tensors as `PreTrainedModel`s.

Sannai, Kawano, Kumagai, "Invariant and Equivariant Reynolds Networks", JMLR 25(42), 2024 (arXiv 2110.08092).
Each block is the reductive Reynolds operator over the design of ordered node pairs (O(n²), see `reynolds.py`)
applied to a pair MLP φ, then an optional skip and a channel MLP. Node masks let graphs of different sizes share a
batch: padded nodes never reach real nodes (they are excluded from every sum and from the 1/(n−1) normalisation).

Layout: building blocks -> `ReyNetPreTrainedModel` -> `ReyNetModel` -> heads. Imports only torch, transformers and
files in this folder (Hub remote code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_reynet import ReyNetConfig
from .iegn import IEGNLinear, add_transposed_halves
from .reynolds import pair_blocks


__all__ = [
    "ReyNetPreTrainedModel",
    "ReyNetModel",
    "ReyNetForGraphClassification",
    "ReyNetForEquivariantRegression",
    "ReyNetForInvariantRegression",
    "ReyNetModelOutput",
    "ReyNetEquivariantOutput",
    "ReyNetInvariantOutput",
]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


# ----------------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ReyNetModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_channels, n, n)`):
            Equivariant features; zero at padded nodes.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, 2 * hidden_channels)`):
            Invariant readout: per channel, pooled diagonal then pooled off-diagonal entries.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Input and the output of every block, each `(batch_size, channels, n, n)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ReyNetInvariantOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): classification: cross-entropy, BCE-with-logits or MSE
            (`config.problem_type`); invariant regression: MSE.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)` or `(batch_size, num_targets)`).
        pooler_output (`torch.FloatTensor` of shape `(batch_size, 2 * hidden_channels)`): the encoder's invariant
            readout; `Trainer` leaves it out of its predictions (`config.keys_to_ignore_at_inference`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ReyNetEquivariantOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): MSE over the entries of real nodes.
        logits (`torch.FloatTensor` of shape `(batch_size, num_targets, n, n)`): predicted tensor (zero at padding).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------------
# building blocks (channel-last inside blocks: (B, n, n, F))
# ----------------------------------------------------------------------------------------------------------------------
def _mlp(sizes: list[int], act: str, final_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or final_act:
            layers.append(_ACTIVATIONS[act]())
    return nn.Sequential(*layers)


def _pair_masks(
    node_mask: torch.Tensor | None, B: int, n: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Node mask `(B, n)`, off-diagonal pair mask `(B, n, n)` (both nodes real, a ≠ b) and real-node counts `(B,)`."""
    if node_mask is None:
        node = torch.ones(B, n, dtype=torch.bool, device=device)
    else:
        node = node_mask.bool()
    eye = torch.eye(n, dtype=torch.bool, device=device)
    pair = node[:, :, None] & node[:, None, :] & ~eye
    return node, pair, node.sum(dim=1)


_NOT_A_TOKEN_STREAM = (
    "ReyNet blocks map (B, n, n, C) tensors over the node pairs of zero-padded graphs, not a stream of token states, "
    "so RKSP profiles and the KSS penalty do not apply to them. RKSPCallback(profile_at_init=False) keeps the "
    "divergence guard without profiles."
)


class ReyNetReynoldsBlock(GradientCheckpointingLayer):
    """Reductive Reynolds operator on a pair MLP φ (+ skip and channel MLP): `(B, n, n, C_in)` -> `(B, n, n, C_out)`.

    With `model.activation_checkpointing_enable()` a training forward keeps only the block input for backward and
    recomputes the rest (less activation memory, about one extra forward of time).

    Y[a,b] = φ₁(block(a,b)) for a ≠ b; Y[a,a] = 1/(n_real−1) Σ_{real b≠a} φ₀(block(a,b)) (the paper's normalisation,
    with n the number of real nodes of each graph; a graph with one node gets Y[a,a] = 0).
    """

    _not_a_token_stream = _NOT_A_TOKEN_STREAM

    def __init__(self, config: ReyNetConfig, in_channels: int) -> None:
        super().__init__()
        self.depthwise = config.phi_mode == "depthwise"
        if self.depthwise:
            rey_channels = in_channels
            self.phi = _mlp([4, *config.phi_hidden_sizes, 2], config.hidden_act, final_act=False)
        else:
            rey_channels = config.reynolds_channels or in_channels
            block_size = config.design_order**2  # entries of a principal block per channel
            self.phi = _mlp(
                [block_size * in_channels, *config.phi_hidden_sizes, 2 * rey_channels], config.hidden_act, False
            )
        self.triples = config.design_order == 3
        self.rey_channels = rey_channels
        self.skip = (
            nn.Sequential(nn.Linear(in_channels + rey_channels, rey_channels), _ACTIVATIONS[config.hidden_act]())
            if config.skip_connection
            else None
        )
        self.channel_mlp = _mlp([rey_channels, *config.channel_hidden_sizes], config.hidden_act, final_act=True)
        self.out_channels = config.channel_hidden_sizes[-1] if config.channel_hidden_sizes else rey_channels

    def _first_linear_joint(self, h: torch.Tensor) -> torch.Tensor:
        """φ's first linear layer on every pair block without materialising the `(B, n, n, 4C)` blocks.

        The weight columns for `[X[a,a], X[a,b], X[b,a], X[b,b]]` act separately, so
        `W·block(a,b) + bias = W₁ X[a,b] + W₂ X[b,a] + (W₀ d[a] + bias) + W₃ d[b]`: one `(B, n, n, C) @ (C, 2h)` GEMM
        for `[W₁; W₂]` plus O(n) per-node terms, no block tensor (same result as `self.phi[0](pair_blocks(...))` up to
        float rounding). The per-node additions are in place (autograd keeps no full-size tensor of a sum), so the
        GEMM output and one `(B, n, n, h)` buffer are allocated instead of five full-size tensors.
        """
        first = self.phi[0]
        W = first.weight.reshape(first.out_features, -1, 4)  # (h, C, 4): channel-major block layout
        d = h.diagonal(dim1=1, dim2=2).transpose(1, 2)  # (B, n, C)
        # the X[a,b] and X[b,a] terms as one (B, n, n, C) @ (C, 2h) GEMM: h is read once and, in backward, one
        # input-gradient GEMM and one saved input serve both
        pre = add_transposed_halves(h @ torch.cat((W[:, :, 1], W[:, :, 2]), dim=0).T)  # (B, n, n, h), a fresh buffer
        pre.add_(torch.addmm(first.bias, d.reshape(-1, d.shape[-1]), W[:, :, 0].T)
                 .reshape(*d.shape[:2], 1, first.out_features))  # the width, not -1: an empty graph has no entries
        return pre.add_((d @ W[:, :, 3].T)[:, None, :, :])

    def reynolds(
        self, h: torch.Tensor, pair: torch.Tensor, node: torch.Tensor | None, count: torch.Tensor
    ) -> torch.Tensor:
        """The Reynolds part alone, `(B, n, n, C)` -> `(B, n, n, C')`.

        `node=None` means every node is real (no padding): the masked sums then reduce to "all minus the diagonal",
        which skips two full-size `where` passes. With padding, entries at padded nodes are left unspecified here
        (finite, since padded inputs are zero) and zeroed by [`forward`].
        """
        B, n, _, C = h.shape
        if self.triples:
            return self._reynolds_triples(h, pair, node, count)
        if not self.depthwise and len(self.phi) > 1:
            return self._reynolds_joint(h, pair, node, count)
        if self.depthwise:
            blocks = pair_blocks(h.permute(0, 3, 1, 2))  # (B, n, n, 4C), channel-major
            out = self.phi(blocks.reshape(B, n, n, C, 4))  # (B, n, n, C, 2)
            diag_part, off_part = out[..., 0], out[..., 1]
        else:  # φ is a single linear layer
            out = self._first_linear_joint(h)
            diag_part, off_part = out[..., : self.rey_channels], out[..., self.rey_channels :]
        if node is None:  # Σ_{b≠a} φ₀ = Σ_b φ₀ − φ₀(a, a)
            diag_sum = diag_part.sum(dim=2) - diag_part.diagonal(dim1=1, dim2=2).transpose(1, 2)
        else:
            zero = torch.zeros((), dtype=diag_part.dtype, device=h.device)
            diag_sum = torch.where(pair[..., None], diag_part, zero).sum(dim=2)
        diag = diag_sum / (count - 1).clamp_min(1).to(h.dtype)[:, None, None]  # (B, n, C')
        # off-diagonal entries are φ₁ itself; only its diagonal is replaced (one copy instead of mask + add)
        return torch.diagonal_scatter(off_part, diag.transpose(1, 2), dim1=1, dim2=2)

    def _reynolds_joint(
        self, h: torch.Tensor, pair: torch.Tensor, node: torch.Tensor | None, count: torch.Tensor
    ) -> torch.Tensor:
        """Joint φ with hidden layers, `(B, n, n, C)` -> `(B, n, n, C')`, same maps as the generic path.

        φ's last layer is linear, so the diagonal output commutes with the sum over partners:
        `Σ_{b≠a} (W_d z[a,b] + b_d) = W_d (Σ_{b≠a} z[a,b]) + (#b) b_d`, with z the last hidden activation. The full-size
        GEMM therefore only produces the C' off-diagonal features (half of φ's last layer), the diagonal costs an O(n·h)
        sum plus a `(B·n, h) @ (h, C')` GEMM, and the diagonal of the off-diagonal output is overwritten in place.
        """
        c_out = self.rey_channels
        pre = self._first_linear_joint(h)  # a fresh buffer that nothing else references
        act = self.phi[1]
        # ReLU in place saves a full-size buffer (its backward only needs the output); other activations as modules
        z = torch.relu_(pre) if type(act) is nn.ReLU else act(pre)
        z = self.phi[2:-1](z)  # further hidden layers, if any: (B, n, n, h_last)
        last = self.phi[-1]
        if node is None:  # Σ_{b≠a} z = Σ_b z − z(a, a); n − 1 partners each
            z_sum = z.sum(dim=2) - z.diagonal(dim1=1, dim2=2).transpose(1, 2)
            partners = (count - 1).to(h.dtype)[:, None, None]  # (B, 1, 1)
        else:  # masked row sums as one batched (1, n) @ (n, h) product per node: no full-size masked copy
            pm = pair.to(z.dtype)  # (B, n, n): real b ≠ a
            z_sum = (pm[:, :, None, :] @ z).squeeze(2)  # (B, n, h)
            partners = pm.sum(dim=2, keepdim=True)  # (B, n, 1); 0 for padded a
        diag_sum = z_sum @ last.weight[:c_out].T + partners * last.bias[:c_out]  # (B, n, C')
        diag = diag_sum / (count - 1).clamp_min(1).to(h.dtype)[:, None, None]
        out = nn.functional.linear(z, last.weight[c_out:], last.bias[c_out:])  # φ₁, (B, n, n, C')
        out.diagonal(dim1=1, dim2=2).copy_(diag.transpose(1, 2))  # linear's backward does not need its output
        return out

    def _reynolds_triples(
        self, h: torch.Tensor, pair: torch.Tensor, node: torch.Tensor | None, count: torch.Tensor
    ) -> torch.Tensor:
        """Design of injective triples, `(B, n, n, C)` -> `(B, n, n, C')`; O(n³) time, `B·n³·h` activation memory.

        φ reads the 3×3 principal block of (a, b, c), channel-major and row-major inside the block
        (`[X[a,a], X[a,b], X[a,c], X[b,a], X[b,b], X[b,c], X[c,a], X[c,b], X[c,c]]` per channel), and writes φ₀ at
        (a, a) and φ₁ at (a, b). Normalisation (our choice, the pair design's per-entry mean carried over):
        `Y[a,b] = 1/(n−2) Σ_{c∉{a,b}} φ₁`, `Y[a,a] = 1/((n−1)(n−2)) Σ_{b≠a, c∉{a,b}} φ₀`, i.e.
        `reductive_reynolds_k(φ, X, 3, out_rank=2)` divided entry-wise by its number of terms (0 when a graph has
        fewer than 3 real nodes).

        φ's first linear layer splits over the block's entries, so the `(B, n, n, n, h)` pre-activation is three
        broadcast `(B, n, n, h)` terms `P[a,b] + Q[a,c] + R[b,c]` from one `(B, n, n, C) @ (C, 6h)` GEMM and per-node
        terms. φ's last layer is linear, so it is applied after the sums over c (and b): only the hidden activations
        are n³-sized.
        """
        B, n, _, C = h.shape
        c_out = self.rey_channels
        first = self.phi[0]
        W = first.weight.reshape(first.out_features, C, 9)  # (h, C, 9), local index 3·i + j of block entry (i, j)
        d = h.diagonal(dim1=1, dim2=2).transpose(1, 2)  # (B, n, C)
        # entries X[a,b] (1), X[b,a] (3), X[a,c] (2), X[c,a] (6), X[b,c] (5), X[c,b] (7) as one GEMM
        G = h @ W[:, :, [1, 3, 2, 6, 5, 7]].permute(1, 2, 0).reshape(C, -1)  # (B, n, n, 6h)
        g = G.unflatten(-1, (6, -1))  # (B, n, n, 6, h)
        P = g[..., 0, :] + g[..., 1, :].transpose(1, 2)  # (a, b): W1 X[a,b] + W3 X[b,a]
        Q = g[..., 2, :] + g[..., 3, :].transpose(1, 2)  # (a, c): W2 X[a,c] + W6 X[c,a]
        R = g[..., 4, :] + g[..., 5, :].transpose(1, 2)  # (b, c): W5 X[b,c] + W7 X[c,b]
        P = P + (torch.addmm(first.bias, d.reshape(-1, C), W[:, :, 0].T).reshape(B, n, 1, first.out_features)
                 + (d @ W[:, :, 4].T)[:, None, :, :])  # + W0 d[a] + bias + W4 d[b]
        Q = Q + (d @ W[:, :, 8].T)[:, None, :, :]  # + W8 d[c]
        pre = P[:, :, :, None, :] + Q[:, :, None, :, :]  # (B, n, n, n, h) indexed (a, b, c)
        pre.add_(R[:, None, :, :, :])
        act = self.phi[1]
        z = torch.relu_(pre) if type(act) is nn.ReLU else act(pre)
        z = self.phi[2:-1](z)  # further hidden layers, if any: (B, n, n, n, h_last)
        hl = z.shape[-1]
        # valid third nodes: c real and c ∉ {a, b}; the masked sum over c is one batched (1, n) @ (n, h) product
        eye = torch.eye(n, dtype=torch.bool, device=h.device)
        real = torch.ones(B, n, dtype=torch.bool, device=h.device) if node is None else node
        valid = real[:, None, None, :] & ~eye[None, :, None, :] & ~eye[None, None, :, :]  # (B, n_a, n_b, n_c)
        vm = valid.to(z.dtype)
        z_off = (vm.reshape(-1, 1, n) @ z.reshape(-1, n, hl)).reshape(B, n, n, hl)  # Σ_c z[a,b,c]
        thirds = vm.sum(dim=-1, keepdim=True)  # (B, n, n, 1): n_real − 2 for real a ≠ b
        pm = pair.to(z.dtype)  # (B, n, n): real b ≠ a
        z_diag = (pm[:, :, None, :] @ z_off).squeeze(2)  # (B, n, h): Σ_{b≠a} Σ_c z[a,b,c]
        terms = (pm[..., None] * thirds).sum(dim=2)  # (B, n, 1): (n_real − 1)(n_real − 2) for real a
        last = self.phi[-1]
        diag = (z_diag @ last.weight[:c_out].T + terms * last.bias[:c_out]) / terms.clamp_min(1)
        out = (z_off @ last.weight[c_out:].T + thirds * last.bias[c_out:]) / thirds.clamp_min(1)
        return torch.diagonal_scatter(out, diag.transpose(1, 2), dim1=1, dim2=2)

    def forward(
        self, h: torch.Tensor, pair: torch.Tensor, node: torch.Tensor | None, count: torch.Tensor
    ) -> torch.Tensor:
        y = self.reynolds(h, pair, node, count)
        if self.skip is not None:
            y = self.skip(torch.cat((h, y), dim=-1))
        y = self.channel_mlp(y)
        return _zero_padding(y, node)


class ReyNetIEGNBlock(GradientCheckpointingLayer):
    """Maron et al.'s linear equivariant layer + activation (the baseline): `(B, n, n, C_in)` -> `(B, n, n, C_out)`."""

    _not_a_token_stream = _NOT_A_TOKEN_STREAM

    def __init__(self, config: ReyNetConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = IEGNLinear(in_channels, out_channels)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.out_channels = out_channels

    def forward(
        self, h: torch.Tensor, pair: torch.Tensor, node: torch.Tensor | None, count: torch.Tensor
    ) -> torch.Tensor:
        # channel-last path (plain GEMMs, no permutes); its input h has zero padding, as every block output has
        y = self.act(self.linear.forward_channels_last(h, count))
        return _zero_padding(y, node)


def _zero_padding(y: torch.Tensor, node: torch.Tensor | None) -> torch.Tensor:
    """Zero the entries of `(B, n, n, F)` that involve a padded node; `node=None` means no padding (no-op)."""
    if node is None:
        return y
    both = node[:, :, None, None] & node[:, None, :, None]
    return torch.where(both, y, torch.zeros((), dtype=y.dtype, device=y.device))


class ReyNetPooler(nn.Module):
    """Invariant readout `(B, n, n, F)` -> `(B, 2F)`: pooled diagonal and pooled off-diagonal entries per channel."""

    def __init__(self, config: ReyNetConfig) -> None:
        super().__init__()
        self.mean = config.pooling == "mean"

    def forward(
        self, h: torch.Tensor, pair: torch.Tensor, node: torch.Tensor | None, count: torch.Tensor
    ) -> torch.Tensor:
        # h is zero at padded nodes (every block zeroes them), so plain sums already run over real nodes only
        diag = h.diagonal(dim1=1, dim2=2).sum(dim=-1)  # (B, F)
        off = h.sum(dim=(1, 2)) - diag
        if self.mean:
            c = count.to(h.dtype)[:, None]
            diag = diag / c.clamp_min(1)
            off = off / (c * (c - 1)).clamp_min(1)
        return torch.cat((diag, off), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# pretrained base
# ----------------------------------------------------------------------------------------------------------------------
class ReyNetPreTrainedModel(PreTrainedModel):
    config_class = ReyNetConfig
    config: ReyNetConfig
    base_model_prefix = "reynet"
    main_input_name = "graph_tensor"
    accepts_loss_kwargs = False  # our losses are per-batch means
    _no_split_modules = ["ReyNetReynoldsBlock", "ReyNetIEGNBlock"]
    supports_gradient_checkpointing = True  # per block (`GradientCheckpointingLayer`), non-reentrant by default

    def __init__(self, config: ReyNetConfig, *inputs, **kwargs) -> None:
        # the config checked itself in its __init__, but `from_pretrained(path, **overrides)` sets the overrides
        # afterwards with setattr (and a field may be changed by hand): check again before any layer is built
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if self.config.initializer == "xavier_uniform":  # the paper's code: Xavier-uniform weights, zero biases
                init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    init.zeros_(module.bias)
            else:
                module.reset_parameters()
        elif isinstance(module, IEGNLinear):
            init.normal_(module.weight, mean=0.0, std=(2.0 / (module.in_channels + module.out_channels)) ** 0.5)
            init.zeros_(module.bias_all)
            init.zeros_(module.bias_diag)


def _compute_dtype(model: torch.nn.Module, given: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype the inputs must have: the weights' (`model.dtype`), or `None` (not checked) under FSDP2
    (`fully_shard`), whose parameters keep their sharded storage dtype while a mixed-precision policy runs the forward
    (and casts the inputs) in its own `param_dtype`. Inputs of the weights' dtype (`given`) skip the look-up, which
    walks every module. The twin in `equivcnp/neural_process.py` keeps each Hub code folder self-contained."""
    dtype = model.dtype
    if given == dtype:
        return dtype
    fsdp_module = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules()):
        return None
    return dtype


def _can_read_values(tensor: torch.Tensor) -> bool:
    """Whether a check may read `tensor`'s values on the host: not while `torch.compile` traces (a data-dependent
    branch breaks the graph) and not on the meta device (no values)."""
    return tensor.device.type != "meta" and not torch.compiler.is_compiling()


def _check_inputs(
    graph_tensor: torch.Tensor, node_mask: torch.Tensor | None, in_channels: int, dtype: torch.dtype | None = None
) -> None:
    """Refuse inputs the blocks would fail on deep inside torch, naming the fix. `dtype` is the dtype of the model's
    weights: a floating `graph_tensor` of another dtype is refused (except a float32 / half one under autocast, which
    casts it; autocast leaves float64 as it is)."""
    if not isinstance(graph_tensor, torch.Tensor):
        raise TypeError(f"graph_tensor must be a torch.Tensor of shape (B, C, n, n), got {type(graph_tensor).__name__}")
    if graph_tensor.dim() != 4 or graph_tensor.shape[-1] != graph_tensor.shape[-2]:
        raise ValueError(f"graph_tensor must have shape (B, C, n, n), got {tuple(graph_tensor.shape)}")
    if graph_tensor.shape[1] != in_channels:
        raise ValueError(
            f"graph_tensor has {graph_tensor.shape[1]} channels but config.in_channels={in_channels}; "
            "build the model with a matching ReyNetConfig(in_channels=...)."
        )
    if not graph_tensor.is_floating_point():
        raise TypeError(f"graph_tensor must be a floating-point tensor, got {graph_tensor.dtype}")
    # autocast casts float32 / half inputs for its matmuls, never float64
    if (dtype is not None and graph_tensor.dtype != dtype
            and not (torch.is_autocast_enabled(graph_tensor.device.type) and graph_tensor.dtype != torch.float64)):
        raise TypeError(
            f"graph_tensor is {graph_tensor.dtype} but the model's weights are {dtype}; cast the input with "
            f".to({dtype}) (for ReyNetGraphCollator: dtype={dtype}) or the model with model.to({graph_tensor.dtype})"
        )
    if node_mask is not None:
        B, _, n, _ = graph_tensor.shape
        if not isinstance(node_mask, torch.Tensor):
            raise TypeError(f"node_mask must be a torch.Tensor of shape (B, n) = {(B, n)}, got "
                            f"{type(node_mask).__name__}; convert it with torch.as_tensor(node_mask, dtype=torch.bool)")
        if node_mask.shape != (B, n):
            raise ValueError(f"node_mask must have shape (B, n) = {(B, n)}, got {tuple(node_mask.shape)}")
        if (node_mask.dtype != torch.bool and _can_read_values(node_mask)
                and not bool(((node_mask == 0) | (node_mask == 1)).all())):
            raise ValueError("node_mask marks real nodes (1 / True) and padding (0 / False); it holds other values "
                             "(e.g. 0.5 or 2): pass a boolean mask, e.g. node_mask > 0.5.")
    # padding may hold anything: only entries between real nodes are read (the mask is applied only when some entry
    # is not finite)
    finite = torch.isfinite(graph_tensor) if _can_read_values(graph_tensor) else None
    if finite is not None and not bool(finite.all()):
        if node_mask is not None:
            real = node_mask.bool()
            finite = finite | ~(real[:, None, :, None] & real[:, None, None, :])
        if not bool(finite.all()):
            raise ValueError("graph_tensor contains NaN or inf between real nodes; clean the features (padding "
                             "marked False in node_mask may hold anything).")


def _maybe_tuple(output: ModelOutput, return_dict: bool | None, config: ReyNetConfig) -> ModelOutput | tuple:
    """`output`, or its non-None fields as a tuple when `return_dict` (default `config.return_dict`) is False."""
    return_dict = return_dict if return_dict is not None else config.return_dict
    return output if return_dict else output.to_tuple()


class ReyNetModel(ReyNetPreTrainedModel):
    """The bare ReyNet encoder: equivariant features `(B, C', n, n)` and their invariant readout.

    Example:

    ```python
    >>> import torch
    >>> from hf_koopman import ReyNetConfig, ReyNetModel
    >>> model = ReyNetModel(ReyNetConfig(in_channels=2, channel_hidden_sizes=[8]))
    >>> x = torch.rand(3, 2, 5, 5)
    >>> model(x).last_hidden_state.shape
    torch.Size([3, 8, 5, 5])
    ```
    """

    def __init__(self, config: ReyNetConfig) -> None:
        super().__init__(config)
        blocks: list[nn.Module] = []
        channels = config.in_channels
        if config.layer_type == "reynolds":
            for _ in range(config.num_reynolds_layers):
                block = ReyNetReynoldsBlock(config, channels)
                blocks.append(block)
                channels = block.out_channels
        else:
            for width in config.channel_hidden_sizes:
                blocks.append(ReyNetIEGNBlock(config, channels, width))
                channels = width
        self.blocks = nn.ModuleList(blocks)
        self.pooler = ReyNetPooler(config)
        self.post_init()

    def _checkpointing_input(self, h: torch.Tensor) -> torch.Tensor:
        """The first block's input `(B, n, n, C)`, made to require grad when a block will be checkpointed.

        Reentrant checkpointing (`use_reentrant=True`) back-propagates into a checkpointed block only if one of its
        tensor inputs requires grad; the raw graph tensor does not, so every block parameter would get no gradient.
        A detached alias that requires grad restores them (same values, the caller's tensor is left untouched); the
        non-reentrant mode gives the same gradients with or without it.
        """
        checkpointed = any(getattr(block, "gradient_checkpointing", False) for block in self.blocks)
        if checkpointed and self.training and torch.is_grad_enabled() and not h.requires_grad:
            return h.detach().requires_grad_(True)
        return h

    def forward(
        self,
        graph_tensor: torch.Tensor,
        node_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ReyNetModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            graph_tensor (`torch.FloatTensor` of shape `(batch_size, in_channels, n, n)`):
                Per-channel n×n tensors (e.g. normalised adjacency and one-hot node labels on the diagonal).
            node_mask (`torch.BoolTensor` of shape `(batch_size, n)`, *optional*):
                True for real nodes. Padded nodes do not influence real nodes; their outputs are zero.
            output_hidden_states (`bool`, *optional*):
                Return the input and every block's output (channel-first).
            return_dict (`bool`, *optional*):
                Return a [`ReyNetModelOutput`] (default: `config.return_dict`) or, if False, its non-None fields as a
                tuple.
        """
        _check_inputs(graph_tensor, node_mask, self.config.in_channels,
                      _compute_dtype(self, getattr(graph_tensor, "dtype", None)))
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        B, _, n, _ = graph_tensor.shape
        node, pair, count = _pair_masks(node_mask, B, n, graph_tensor.device)
        h = _zero_padding(graph_tensor.permute(0, 2, 3, 1), node)  # (B, n, n, C)
        if node_mask is None or bool(node.all()):
            node = None  # no padding (e.g. a size bucket of equal-size graphs): blocks skip the masking passes
        states = [h] if output_hidden_states else None
        h = self._checkpointing_input(h)
        for block in self.blocks:
            h = block(h, pair, node, count)
            if states is not None:
                states.append(h)
        pooled = self.pooler(h, pair, node, count)
        output = ReyNetModelOutput(
            last_hidden_state=h.permute(0, 3, 1, 2),
            pooler_output=pooled,
            hidden_states=tuple(s.permute(0, 3, 1, 2) for s in states) if states is not None else None,
        )
        return _maybe_tuple(output, return_dict, self.config)


# ----------------------------------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------------------------------
class _InvariantHead(nn.Module):
    def __init__(self, config: ReyNetConfig, out_features: int) -> None:
        super().__init__()
        sizes = [2 * config.hidden_channels, *config.head_hidden_sizes, out_features]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            if config.head_dropout > 0:
                layers.append(nn.Dropout(config.head_dropout))
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[config.hidden_act]())
        self.mlp = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


def _regression_loss(logits: torch.Tensor, labels: torch.Tensor, outputs: str) -> torch.Tensor:
    """MSE between `logits (B, T)` and `labels` of shape `(B, T)`, or `(B,)` when T == 1; `outputs` names T."""
    B, T = logits.shape
    target = labels.to(device=logits.device, dtype=logits.dtype)
    if T == 1 and target.shape == (B,):
        target = target[:, None]
    if target.shape != logits.shape:
        one = f" or ({B},)" if T == 1 else ""
        raise ValueError(
            f"regression labels must have shape (batch_size, {outputs}) = {tuple(logits.shape)}{one}, "
            f"got {tuple(labels.shape)}; give one row of {T} target(s) per graph."
        )
    return nn.functional.mse_loss(logits, target)


def _infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' rule for sequence classifiers: one output -> regression, integer labels -> single-label."""
    if num_labels == 1:
        return "regression"
    if not labels.is_floating_point() and labels.dtype != torch.bool:
        return "single_label_classification"
    return "multi_label_classification"


def _single_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `logits (B, L)` and class indices `labels (B,)` (or `(B, 1)`); -100 marks ignored graphs."""
    B = logits.shape[0]
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"problem_type='single_label_classification' needs integer class indices, got {labels.dtype} labels; "
            "pass them as a LongTensor of shape (batch_size,), or set problem_type='multi_label_classification' "
            "(multi-hot labels) or 'regression'."
        )
    if labels.shape not in ((B,), (B, 1)) and not (labels.dim() == 0 and B == 1):
        raise ValueError(
            f"problem_type='single_label_classification' needs one class index per graph, labels of shape "
            f"(batch_size,) = ({B},), got {tuple(labels.shape)}; multi-hot labels of shape (batch_size, "
            "num_labels) need problem_type='multi_label_classification'."
        )
    target = labels.to(logits.device).long().view(-1)
    outside = (target != -100) & ((target < 0) | (target >= logits.shape[-1]))
    if _can_read_values(target) and bool(outside.any()):
        raise ValueError(
            f"labels hold class {int(target[outside][0])} but the model has num_labels={logits.shape[-1]} classes "
            f"(0..{logits.shape[-1] - 1}; -100 ignores a graph): build it with ReyNetConfig(num_labels=...) for every "
            "class, or map the labels to 0..num_labels-1."
        )
    return nn.functional.cross_entropy(logits, target)


def _multi_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of `logits (B, L)` and multi-hot `labels (B, L)` (0/1 or probabilities)."""
    if labels.shape != logits.shape:
        raise ValueError(
            "problem_type='multi_label_classification' needs multi-hot labels of shape (batch_size, num_labels) = "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}; class indices of shape (batch_size,) "
            "need problem_type='single_label_classification' (and integer labels)."
        )
    target = labels.to(device=logits.device, dtype=logits.dtype)
    if not bool(((target >= 0) & (target <= 1)).all()):  # also NaN
        raise ValueError(
            "problem_type='multi_label_classification' needs multi-hot labels (or probabilities) in [0, 1], got values "
            f"in [{float(target.min()):.3g}, {float(target.max()):.3g}]; real-valued targets need "
            "problem_type='regression' (or ReyNetForInvariantRegression)."
        )
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: ReyNetConfig) -> torch.Tensor:
    """Loss of the classification head under `config.problem_type`, inferred from the labels when None.

    As in transformers' sequence classifiers, an inferred problem type is written to the config (here only once the
    labels fit it), so that a saved model, and a pipeline choosing softmax or sigmoid from it, keeps it.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor (class indices (B,), multi-hot (B, num_labels) or regression "
                        f"targets), got {type(labels).__name__}; convert them with torch.as_tensor (class names map "
                        "to indices through config.label2id)")
    losses = {
        "single_label_classification": _single_label_loss,
        "multi_label_classification": _multi_label_loss,
        "regression": lambda lg, lb: _regression_loss(lg, lb, "num_labels"),
    }
    problem_type = config.problem_type or _infer_problem_type(config.num_labels, labels)
    if problem_type not in losses:
        raise ValueError(
            f"config.problem_type={problem_type!r} is not one of {tuple(losses)} (or None to infer it from the labels)."
        )
    try:
        loss = losses[problem_type](logits, labels)
    except ValueError as err:
        if config.problem_type is not None:
            raise
        raise ValueError(
            f"{err} (config.problem_type is None, so {problem_type!r} was inferred from num_labels="
            f"{config.num_labels} and {labels.dtype} labels; set config.problem_type to choose.)"
        ) from None
    config.problem_type = problem_type
    return loss


class ReyNetForGraphClassification(ReyNetPreTrainedModel):
    """ReyNet + invariant pooling + MLP head with `config.num_labels` outputs, registered as
    `AutoModelForSequenceClassification`.

    The loss follows transformers' sequence-classification convention (`config.problem_type`): cross-entropy on class
    indices, BCE-with-logits on multi-hot labels, or MSE (regression; `num_labels=1` infers it). For regression on
    several targets [`ReyNetForInvariantRegression`] (`config.num_targets`) is the dedicated head.
    """

    def __init__(self, config: ReyNetConfig) -> None:
        super().__init__(config)
        if config.problem_type == "single_label_classification" and config.num_labels < 2:
            raise ValueError(
                f"ReyNetForGraphClassification with problem_type='single_label_classification' needs num_labels >= 2, "
                f"got {config.num_labels}; use num_labels=2 for binary classification, or problem_type='regression' "
                "(or ReyNetForInvariantRegression) for a single regression output."
            )
        self.reynet = ReyNetModel(config)
        self.classifier = _InvariantHead(config, config.num_labels)
        self.post_init()

    def forward(
        self,
        graph_tensor: torch.Tensor,
        node_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ReyNetInvariantOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            graph_tensor (`torch.FloatTensor` of shape `(batch_size, in_channels, n, n)`): the graph tensors.
            node_mask (`torch.BoolTensor` of shape `(batch_size, n)`, *optional*): real (True) and padded (False) nodes.
            labels (`torch.Tensor`, *optional*): by `config.problem_type`: class indices `(batch_size,)` in
                `[0, num_labels)` (`LongTensor`), multi-hot `(batch_size, num_labels)` or regression targets
                `(batch_size, num_labels)` (`FloatTensor`).
            output_hidden_states (`bool`, *optional*): also return the input and every block's output as
                `hidden_states` (channel-first).
            return_dict (`bool`, *optional*): a [`ReyNetInvariantOutput`] (default: `config.return_dict`) or a tuple.
        """
        out = self.reynet(graph_tensor, node_mask=node_mask, output_hidden_states=output_hidden_states,
                          return_dict=True)
        logits = self.classifier(out.pooler_output)
        loss = _classification_loss(logits, labels, self.config) if labels is not None else None
        output = ReyNetInvariantOutput(
            loss=loss, logits=logits, pooler_output=out.pooler_output, hidden_states=out.hidden_states
        )
        return _maybe_tuple(output, return_dict, self.config)


class ReyNetForInvariantRegression(ReyNetPreTrainedModel):
    """ReyNet + invariant pooling + MLP regressor (`config.num_targets` outputs); MSE loss."""

    def __init__(self, config: ReyNetConfig) -> None:
        super().__init__(config)
        self.reynet = ReyNetModel(config)
        self.regressor = _InvariantHead(config, config.num_targets)
        self.post_init()

    def forward(
        self,
        graph_tensor: torch.Tensor,
        node_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ReyNetInvariantOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            graph_tensor (`torch.FloatTensor` of shape `(batch_size, in_channels, n, n)`): the graph tensors.
            node_mask (`torch.BoolTensor` of shape `(batch_size, n)`, *optional*): real (True) and padded (False) nodes.
            labels (`torch.FloatTensor`, *optional*): regression targets of shape `(batch_size, num_targets)`, or
                `(batch_size,)` when `num_targets` is 1.
            output_hidden_states (`bool`, *optional*): also return the input and every block's output as
                `hidden_states` (channel-first).
            return_dict (`bool`, *optional*): a [`ReyNetInvariantOutput`] (default: `config.return_dict`) or a tuple.
        """
        out = self.reynet(graph_tensor, node_mask=node_mask, output_hidden_states=output_hidden_states,
                          return_dict=True)
        logits = self.regressor(out.pooler_output)
        loss = _regression_loss(logits, labels, "num_targets") if labels is not None else None
        output = ReyNetInvariantOutput(
            loss=loss, logits=logits, pooler_output=out.pooler_output, hidden_states=out.hidden_states
        )
        return _maybe_tuple(output, return_dict, self.config)


class ReyNetForEquivariantRegression(ReyNetPreTrainedModel):
    """ReyNet + a linear 1×1 projection to `config.num_targets` channels: matrix -> matrix; MSE over real entries."""

    def __init__(self, config: ReyNetConfig) -> None:
        super().__init__(config)
        self.reynet = ReyNetModel(config)
        self.projection = nn.Linear(config.hidden_channels, config.num_targets)
        self.post_init()

    def forward(
        self,
        graph_tensor: torch.Tensor,
        node_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ReyNetEquivariantOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            graph_tensor (`torch.FloatTensor` of shape `(batch_size, in_channels, n, n)`): the graph tensors.
            node_mask (`torch.BoolTensor` of shape `(batch_size, n)`, *optional*): real (True) and padded (False) nodes.
            labels (`torch.FloatTensor`, *optional*): target tensor of shape `(batch_size, num_targets, n, n)`, or
                `(batch_size, n, n)` when `num_targets == 1`; entries of padded nodes are ignored.
            output_hidden_states (`bool`, *optional*): also return the input and every block's output as
                `hidden_states` (channel-first).
            return_dict (`bool`, *optional*): a [`ReyNetEquivariantOutput`] (default: `config.return_dict`) or a
                tuple.
        """
        out = self.reynet(graph_tensor, node_mask=node_mask, output_hidden_states=output_hidden_states,
                          return_dict=True)
        B, _, n, _ = graph_tensor.shape
        node, _, _ = _pair_masks(node_mask, B, n, graph_tensor.device)
        h = out.last_hidden_state.permute(0, 2, 3, 1)
        pred = _zero_padding(self.projection(h), node).permute(0, 3, 1, 2)  # (B, T, n, n)
        loss = None
        if labels is not None:
            target = labels.to(device=pred.device, dtype=pred.dtype)
            if target.dim() == 3:
                target = target[:, None]
            if target.shape != pred.shape:
                raise ValueError(f"labels must have shape {tuple(pred.shape)}, got {tuple(labels.shape)}")
            both = (node[:, :, None] & node[:, None, :])[:, None].expand_as(pred)
            loss = nn.functional.mse_loss(pred[both], target[both])
        output = ReyNetEquivariantOutput(loss=loss, logits=pred, hidden_states=out.hidden_states)
        return _maybe_tuple(output, return_dict, self.config)
