"""Configuration of the RKSP research transformer (GPT-style decoder and ViT-style encoder)."""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["RKSPGPTConfig", "NORM_TYPES", "MLP_TYPES"]

# The six normalisation placements compared in the RKSP paper (Table 1).
NORM_TYPES = ("pre_ln", "post_ln", "rmsnorm", "deepnorm", "subln", "none")
# Feed-forward sub-layer: the usual GELU MLP, or a two-layer B-spline KAN (the paper's KAN transformer, Table 18).
MLP_TYPES = ("mlp", "kan")


class RKSPGPTConfig(PreTrainedConfig):
    r"""
    Configuration of the small transformer used to re-measure the RKSP paper's results
    (https://huggingface.co/papers/2602.22988, Sec. 5.1).

    One config drives three heads: `RKSPGPTForCausalLM` (next-token LM), `RKSPGPTForSequenceClassification`
    (cross-entropy on the last position, the associative-recall loss of App. D.1) and `RKSPViTForImageClassification`
    (patch embedding + CLS token, bidirectional attention).

    Args:
        vocab_size (`int`, *optional*, defaults to 256): token vocabulary.
        hidden_size (`int`, *optional*, defaults to 64): residual width `d`.
        num_hidden_layers (`int`, *optional*, defaults to 4): number of residual blocks `L` (one block = attention + MLP).
        num_attention_heads (`int`, *optional*, defaults to 4): heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*): MLP width, defaults to `4 * hidden_size`.
        max_position_embeddings (`int`, *optional*, defaults to 128): learned absolute positions.
        norm (`str`, *optional*, defaults to `"pre_ln"`): one of `"pre_ln"`, `"post_ln"`, `"rmsnorm"`, `"deepnorm"`,
            `"subln"`, `"none"`:

            - `pre_ln`: `h + f(LN(h))`, final LN (GPT-2).
            - `post_ln`: `LN(h + f(h))`, no final LN (original transformer).
            - `rmsnorm`: as `pre_ln` with RMSNorm.
            - `deepnorm`: `LN(alpha * h + f(h))` with `alpha = (2L)^(1/4)` and value/output/MLP weights scaled by
              `beta = (8L)^(-1/4)` at init (DeepNet, decoder-only constants).
            - `subln`: `pre_ln` plus an extra LN before each sub-layer's output projection, with the
              `sqrt(log(2L))` init gain of Magneto.
            - `none`: `h + f(h)`, no normalisation anywhere.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of LN / RMSNorm.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the normal init of linear and embedding weights.
        dropout (`float`, *optional*, defaults to 0.0): dropout on attention output, MLP output and embeddings.
        image_size (`int`, *optional*, defaults to 28): image side for the ViT head.
        patch_size (`int`, *optional*, defaults to 7): patch side for the ViT head (must divide `image_size`).
        num_channels (`int`, *optional*, defaults to 1): image channels for the ViT head.
        mlp_type (`str`, *optional*, defaults to `"mlp"`): `"mlp"` (`fc_out(gelu(fc_in(x)))`) or `"kan"`: two
            B-spline KAN layers `d -> intermediate_size -> d` (Liu et al. 2024), each
            `y = W_base silu(x) + sum_i c_i B_i(x)` per input coordinate (see `RKSPKANLinear`).
        kan_grid_size (`int`, *optional*, defaults to 5): spline intervals G on `[-kan_grid_range, kan_grid_range]`.
        kan_spline_order (`int`, *optional*, defaults to 3): spline degree k (3 = cubic, the paper's "order B = 4"
            in de Boor's counting); each input coordinate has `G + k` basis functions.
        kan_grid_range (`float`, *optional*, defaults to 2.0): half-width of the spline grid; inputs outside it see
            only the SiLU base branch (the splines vanish there).

    Example:

    ```python
    >>> from research.rksp_gpt import RKSPGPTConfig  # registers "rksp_gpt" with the Auto classes
    >>> from transformers import AutoModelForCausalLM
    >>> config = RKSPGPTConfig(hidden_size=32, num_hidden_layers=2, norm="none")
    >>> model = AutoModelForCausalLM.from_config(config)
    ```
    """

    model_type = "rksp_gpt"
    attribute_map = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 128,
        norm: str = "pre_ln",
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        dropout: float = 0.0,
        image_size: int = 28,
        patch_size: int = 7,
        num_channels: int = 1,
        tie_word_embeddings: bool = False,
        mlp_type: str = "mlp",
        kan_grid_size: int = 5,
        kan_spline_order: int = 3,
        kan_grid_range: float = 2.0,
        **kwargs,
    ):
        if norm not in NORM_TYPES:
            raise ValueError(f"norm={norm!r} is not supported; choose one of {NORM_TYPES}.")
        if mlp_type not in MLP_TYPES:
            raise ValueError(f"mlp_type={mlp_type!r} is not supported; choose one of {MLP_TYPES}.")
        if not (isinstance(kan_grid_size, int) and kan_grid_size >= 1 and isinstance(kan_spline_order, int)
                and kan_spline_order >= 0):
            raise ValueError(f"kan_grid_size={kan_grid_size!r} must be an int >= 1 and kan_spline_order="
                             f"{kan_spline_order!r} an int >= 0.")
        if not kan_grid_range > 0:
            raise ValueError(f"kan_grid_range={kan_grid_range!r} must be > 0.")
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("max_position_embeddings", max_position_embeddings),
            ("image_size", image_size),
            ("patch_size", patch_size),
            ("num_channels", num_channels),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}; "
                "change one of them."
            )
        if image_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1).")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.norm = norm
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.dropout = dropout
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.mlp_type = mlp_type
        self.kan_grid_size = kan_grid_size
        self.kan_spline_order = kan_spline_order
        self.kan_grid_range = float(kan_grid_range)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
