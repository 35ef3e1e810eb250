"""A small configurable GPT-style transformer (and a ViT variant) for re-measuring the RKSP paper's experiments.

Every block is one residual transition `h_l -> h_{l+1}` (attention + MLP), so `hf_koopman.profile` sees exactly the
layer transitions of the paper (Eq. 1). The normalisation placement is a config switch (`config.norm`), which is the
variable of the paper's Tables 1-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutput,
    ImageClassifierOutput,
    SequenceClassifierOutput,
)

from .configuration_rksp_gpt import RKSPGPTConfig

__all__ = [
    "RKSPGPTPreTrainedModel",
    "RKSPGPTModel",
    "RKSPGPTForCausalLM",
    "RKSPGPTForSequenceClassification",
    "RKSPViTModel",
    "RKSPViTForImageClassification",
]


class RKSPRMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no centring, no bias)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _make_norm(config: RKSPGPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RKSPRMSNorm(config.hidden_size, config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def _branch_gain(config: RKSPGPTConfig) -> float:
    """Init gain of the value / output / MLP projections: DeepNet's beta, Magneto's gamma, else 1."""
    n = config.num_hidden_layers
    if config.norm == "deepnorm":
        return (8.0 * n) ** -0.25  # DeepNet, decoder-only
    if config.norm == "subln":
        return math.sqrt(math.log(2.0 * n))  # Magneto (Sub-LN); log(2) > 0 so defined for n = 1
    return 1.0


class RKSPAttention(nn.Module):
    """Multi-head self-attention. `causal=False` gives the bidirectional attention of the ViT head."""

    def __init__(self, config: RKSPGPTConfig, causal: bool):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.causal = causal
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.v_proj._rksp_init_gain = self.o_proj._rksp_init_gain = _branch_gain(config)
        # Sub-LN puts a norm right before the output projection.
        self.inner_norm = _make_norm(config) if config.norm == "subln" else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = None
        if attention_mask is not None:  # (B, T) 1 = keep; keys that are padding are masked out
            mask = attention_mask[:, None, None, :].to(torch.bool)
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.dropout(self.o_proj(self.inner_norm(out)))


class RKSPMLP(nn.Module):
    def __init__(self, config: RKSPGPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.fc_in._rksp_init_gain = self.fc_out._rksp_init_gain = _branch_gain(config)
        self.inner_norm = (
            nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps) if config.norm == "subln" else nn.Identity()
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.inner_norm(F.gelu(self.fc_in(x)))))


class RKSPKANLinear(nn.Module):
    r"""One B-spline KAN layer (Kolmogorov-Arnold network, Liu et al. 2024), written from its definition.

    Every input coordinate `x_i` passes through its own learnable univariate function per output, the sum of a SiLU
    base and a spline: `y_o = sum_i W_base[o, i] silu(x_i) + sum_i sum_j C[o, i, j] B_j(x_i)`. The `B_j` are the
    `G + k` B-splines of degree `k` on a uniform grid of `G` intervals over `[-R, R]`, extended by `k` knots on each
    side (Cox-de Boor recursion). The splines vanish outside the extended grid, where only the SiLU base remains.

    Shapes:
        x: `(..., in_features)` -> `(..., out_features)`.
    """

    def __init__(self, in_features: int, out_features: int, *, grid_size: int, spline_order: int, grid_range: float):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order, self.grid_range = grid_size, spline_order, float(grid_range)
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline basis values, `(N, in)` -> `(N, in, G + k)`.

        The knots are rebuilt from the config numbers on each call (a `G + 2k + 1` vector, no buffer to save).
        """
        step = 2.0 * self.grid_range / self.grid_size
        knots = torch.arange(-self.spline_order, self.grid_size + self.spline_order + 1, device=x.device)
        grid = (knots.to(x.dtype) * step - self.grid_range)[None]  # (1, G + 2k + 1), shared by every input coordinate
        x = x.unsqueeze(-1)
        bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
        for j in range(1, self.spline_order + 1):
            left = (x - grid[:, : -(j + 1)]) / (grid[:, j:-1] - grid[:, : -(j + 1)]) * bases[..., :-1]
            right = (grid[:, j + 1 :] - x) / (grid[:, j + 1 :] - grid[:, 1:-j]) * bases[..., 1:]
            bases = left + right
        return bases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        base = F.linear(F.silu(flat), self.base_weight)
        spline = F.linear(self.b_splines(flat).flatten(1), self.spline_weight.flatten(1))
        return (base + spline).reshape(*shape[:-1], self.out_features)


class RKSPKANMLP(nn.Module):
    """Feed-forward sub-layer made of two KAN layers, `d -> intermediate_size -> d` (`config.mlp_type = "kan"`)."""

    def __init__(self, config: RKSPGPTConfig):
        super().__init__()
        kw = {"grid_size": config.kan_grid_size, "spline_order": config.kan_spline_order,
              "grid_range": config.kan_grid_range}
        self.kan_in = RKSPKANLinear(config.hidden_size, config.intermediate_size, **kw)
        self.kan_out = RKSPKANLinear(config.intermediate_size, config.hidden_size, **kw)
        self.kan_in._rksp_init_gain = self.kan_out._rksp_init_gain = _branch_gain(config)
        self.inner_norm = (
            nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps) if config.norm == "subln" else nn.Identity()
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.kan_out(self.inner_norm(self.kan_in(x))))


class RKSPGPTBlock(GradientCheckpointingLayer):
    """One residual transition `h_{l+1} = F_l(h_l)` (attention then MLP), with the normalisation of `config.norm`.

    Shapes:
        hidden_states: `(B, T, d)` -> `(B, T, d)`.
    """

    def __init__(self, config: RKSPGPTConfig, causal: bool = True):
        super().__init__()
        self.norm_type = config.norm
        self.attn = RKSPAttention(config, causal)
        self.mlp = RKSPKANMLP(config) if getattr(config, "mlp_type", "mlp") == "kan" else RKSPMLP(config)
        if config.norm == "none":
            self.norm_1 = self.norm_2 = None
        else:
            self.norm_1, self.norm_2 = _make_norm(config), _make_norm(config)
        self.alpha = (2.0 * config.num_hidden_layers) ** 0.25 if config.norm == "deepnorm" else 1.0

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = hidden_states
        if self.norm_type in ("pre_ln", "rmsnorm", "subln"):
            h = h + self.attn(self.norm_1(h), attention_mask)
            return h + self.mlp(self.norm_2(h))
        if self.norm_type in ("post_ln", "deepnorm"):  # alpha = 1 for post_ln
            h = self.norm_1(self.alpha * h + self.attn(h, attention_mask))
            return self.norm_2(self.alpha * h + self.mlp(h))
        h = h + self.attn(h, attention_mask)  # "none"
        return h + self.mlp(h)


class RKSPGPTPreTrainedModel(PreTrainedModel):
    config_class = RKSPGPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RKSPGPTBlock"]
    # forward returns a per-batch mean loss and takes no **kwargs: let the Trainer do the grad-accumulation scaling.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std * getattr(module, "_rksp_init_gain", 1.0))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RKSPKANLinear):  # base and spline coefficients: the same normal init as a linear layer
            gain = getattr(module, "_rksp_init_gain", 1.0)
            init.normal_(module.base_weight, mean=0.0, std=std * gain)
            init.normal_(module.spline_weight, mean=0.0, std=std * gain)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RKSPRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RKSPPatchEmbedding):
            init.normal_(module.cls_token, mean=0.0, std=std)
            init.normal_(module.position_embeddings, mean=0.0, std=std)
        elif isinstance(module, nn.Conv2d):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


def _final_norm(config: RKSPGPTConfig) -> nn.Module:
    # Post-LN / DeepNorm blocks already end with a norm; "none" has none by definition.
    return _make_norm(config) if config.norm in ("pre_ln", "rmsnorm", "subln") else nn.Identity()


def _run_blocks(blocks: nn.ModuleList, h: torch.Tensor, attention_mask, output_hidden_states: bool):
    states = (h,) if output_hidden_states else None
    for block in blocks:
        h = block(h, attention_mask)
        if output_hidden_states:
            states = states + (h,)
    return h, states


class RKSPGPTModel(RKSPGPTPreTrainedModel):
    """Token + learned position embeddings, `L` causal blocks, final norm (for the pre-norm variants).

    Shapes:
        input_ids: `(B, T)` -> last_hidden_state `(B, T, d)`.
    """

    def __init__(self, config: RKSPGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(RKSPGPTBlock(config, causal=True) for _ in range(config.num_hidden_layers))
        self.norm = _final_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        t = inputs_embeds.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "raise it in the config or truncate the inputs."
            )
        positions = torch.arange(t, device=inputs_embeds.device)
        h = self.dropout(inputs_embeds + self.embed_positions(positions)[None])
        h, states = _run_blocks(self.layers, h, attention_mask, bool(output_hidden_states))
        return BaseModelOutput(last_hidden_state=self.norm(h), hidden_states=states)


class RKSPGPTForCausalLM(RKSPGPTPreTrainedModel):
    """Next-token language model: `loss = CE(logits[:, :-1], labels[:, 1:])`, `-100` labels ignored.

    Shapes:
        input_ids, labels: `(B, T)` -> logits `(B, T, V)`.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.embed_tokens.weight"}

    def __init__(self, config: RKSPGPTConfig):
        super().__init__(config)
        self.transformer = RKSPGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutput:
        out = self.transformer(input_ids, attention_mask, inputs_embeds, output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class RKSPGPTForSequenceClassification(RKSPGPTPreTrainedModel):
    """Classifies from the last (non-padding) position: with `num_labels = vocab_size` this is exactly the
    associative-recall loss of the paper, `F.cross_entropy(logits[:, -1, :], y)` (App. D.1).

    Shapes:
        input_ids: `(B, T)`, labels: `(B,)` -> logits `(B, num_labels)`.
    """

    def __init__(self, config: RKSPGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = RKSPGPTModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput:
        out = self.transformer(input_ids, attention_mask, inputs_embeds, output_hidden_states)
        h = out.last_hidden_state
        if attention_mask is None:
            pooled = h[:, -1]
        else:  # last position whose mask is 1 (right padding)
            last = attention_mask.long().sum(-1).clamp(min=1) - 1
            pooled = h[torch.arange(h.shape[0], device=h.device), last]
        logits = self.score(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class RKSPPatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens, plus a CLS token and learned positions.

    Shapes:
        pixel_values: `(B, C, H, W)` -> `(B, 1 + (H/p)*(W/p), d)`.
    """

    def __init__(self, config: RKSPGPTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        n = (config.image_size // config.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class RKSPViTModel(RKSPGPTPreTrainedModel):
    """ViT-style encoder: patch embedding, `L` bidirectional blocks with `config.norm`, final norm.

    Shapes:
        pixel_values: `(B, C, H, W)` -> last_hidden_state `(B, 1 + P, d)`.
    """

    main_input_name = "pixel_values"
    base_model_prefix = "vit"

    def __init__(self, config: RKSPGPTConfig):
        super().__init__(config)
        self.embeddings = RKSPPatchEmbedding(config)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(RKSPGPTBlock(config, causal=False) for _ in range(config.num_hidden_layers))
        self.norm = _final_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.proj

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, return_dict: bool | None = None):
        c, s = self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel_values must have shape (B, {c}, {s}, {s}); got {tuple(pixel_values.shape)}.")
        h = self.dropout(self.embeddings(pixel_values))
        h, states = _run_blocks(self.layers, h, None, bool(output_hidden_states))
        return BaseModelOutput(last_hidden_state=self.norm(h), hidden_states=states)


class RKSPViTForImageClassification(RKSPGPTPreTrainedModel):
    """ViT classifier on the CLS token (the paper's Table 9 model, shrunk for CPU).

    Shapes:
        pixel_values: `(B, C, H, W)`, labels: `(B,)` -> logits `(B, num_labels)`.
    """

    main_input_name = "pixel_values"
    base_model_prefix = "vit"

    def __init__(self, config: RKSPGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = RKSPViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput:
        out = self.vit(pixel_values, output_hidden_states)
        logits = self.classifier(out.last_hidden_state[:, 0])
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
