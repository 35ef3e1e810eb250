"""Configuration of ReyNet (Reynolds networks on graphs / 2-tensors). Imports only transformers (Hub remote code)."""

from __future__ import annotations

from transformers import PreTrainedConfig


__all__ = ["ReyNetConfig"]

_LAYER_TYPES = ("reynolds", "iegn")
_PHI_MODES = ("depthwise", "joint")
_POOLINGS = ("sum", "mean")
_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ReyNetConfig: {name} must be a positive integer, got {value!r}")


def _int_list(name: str, value, *, allow_empty: bool) -> list[int]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"ReyNetConfig: {name} must be a list of positive integers, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"ReyNetConfig: {name} must not be empty")
    return value


def _choice(name: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"ReyNetConfig: {name}={value!r} is not one of {options}")


class ReyNetConfig(PreTrainedConfig):
    r"""Configuration of [`ReyNetModel`] and its heads.

    A ReyNet block (Sannai, Kawano, Kumagai, JMLR 2024) is the reductive Reynolds operator over the graph design applied
    to a pair MLP φ on 2×2 principal blocks, an optional skip (1×1 conv of `[X; Y]`) and a channel MLP (1×1 convs):

        Y[a,b] = φ₁(X[a,a], X[a,b], X[b,a], X[b,b]),  Y[a,a] = 1/(n−1) Σ_{b≠a} φ₀(...),  then ReLU(W [X; Y]), MLP.

    `problem_type` (a `PreTrainedConfig` keyword) picks the loss of [`ReyNetForGraphClassification`], as for
    transformers' sequence classifiers: `"single_label_classification"` (cross-entropy on class indices),
    `"multi_label_classification"` (BCE-with-logits on multi-hot labels) or `"regression"` (MSE). `None` infers it from
    the first labels: `num_labels == 1` -> regression, integer labels -> single-label, otherwise multi-label.

    Args:
        in_channels (`int`, *optional*, defaults to 1):
            C, channels of the input `graph_tensor` `(B, C, n, n)`.
        layer_type (`str`, *optional*, defaults to `"reynolds"`):
            `"reynolds"` (ReyNet) or `"iegn"`: Maron et al.'s 15-op linear equivariant layers, the baseline of the
            paper, with the same heads (then `channel_hidden_sizes` are the widths of the IEGN layers).
        num_reynolds_layers (`int`, *optional*, defaults to 1):
            Stacked Reynolds blocks; the paper uses one (depth comes from φ and the channel MLP).
        design_order (`int`, *optional*, defaults to 2):
            Nodes per element of the Reynolds design. 2: the ordered pairs (the paper; O(n²)), φ reads 2×2 principal
            blocks. 3: the injective triples (a, b, c) (O(n³) time and `B·n³·h` activation memory), φ reads 3×3
            principal blocks and writes (a, a) and (a, b): `Y[a,b] = mean_c φ₁(block(a,b,c))`,
            `Y[a,a] = mean_{b,c} φ₀(block(a,b,c))`. Order 3 needs `phi_mode="joint"` with at least one hidden layer.
        phi_mode (`str`, *optional*, defaults to `"depthwise"`):
            `"depthwise"`: φ: R⁴ → R² is shared by all channels (the paper's code); `"joint"`: φ: R^{4C} → R^{2C'} mixes
            channels, with C' = `reynolds_channels`.
        phi_hidden_sizes (`list[int]`, *optional*, defaults to `[16, 16, 16]`):
            Hidden widths of φ (`set_layers` in the paper's code).
        reynolds_channels (`int`, *optional*):
            C', output channels of φ in joint mode (defaults to the block's input channels). Ignored when depthwise.
        skip_connection (`bool`, *optional*, defaults to `True`):
            Concatenate the block input and the Reynolds output and mix them with a 1×1 conv + activation.
        channel_hidden_sizes (`list[int]`, *optional*, defaults to `[16, 32, 256]`):
            Channel MLP after each Reynolds block (1×1 convs, each followed by the activation), or the IEGN widths.
        pooling (`str`, *optional*, defaults to `"sum"`):
            Invariant readout: `"sum"` of the diagonal and of the off-diagonal entries (the paper's `DiagOffdiagSumpool`)
            or their `"mean"` (divides by n and n(n−1); better for size generalisation).
        head_hidden_sizes (`list[int]`, *optional*, defaults to `[512, 256]`):
            Hidden widths of the invariant heads' MLP.
        head_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before each head layer.
        hidden_act (`str`, *optional*, defaults to `"relu"`):
            One of `"relu"`, `"gelu"`, `"silu"`, `"tanh"`.
        num_targets (`int`, *optional*, defaults to 1):
            Outputs of [`ReyNetForInvariantRegression`] / output channels of [`ReyNetForEquivariantRegression`].
        initializer (`str`, *optional*, defaults to `"xavier_uniform"`):
            `"xavier_uniform"` (paper code, zero biases) or `"default"` (PyTorch's defaults).

    Example:

    ```python
    >>> from hf_koopman import ReyNetConfig, ReyNetForGraphClassification
    >>> config = ReyNetConfig(in_channels=8, num_labels=2)
    >>> model = ReyNetForGraphClassification(config)
    ```
    """

    model_type = "reynet"
    # `Trainer.evaluate` / `predict` gather every output field except these: the predictions are then the logits alone
    # (not a `(logits, pooler_output)` tuple), so an ordinary `compute_metrics` works
    keys_to_ignore_at_inference = ["pooler_output"]

    def __init__(
        self,
        in_channels: int = 1,
        layer_type: str = "reynolds",
        num_reynolds_layers: int = 1,
        design_order: int = 2,
        phi_mode: str = "depthwise",
        phi_hidden_sizes: list[int] | None = None,
        reynolds_channels: int | None = None,
        skip_connection: bool = True,
        channel_hidden_sizes: list[int] | None = None,
        pooling: str = "sum",
        head_hidden_sizes: list[int] | None = None,
        head_dropout: float = 0.0,
        hidden_act: str = "relu",
        num_targets: int = 1,
        initializer: str = "xavier_uniform",
        **kwargs,
    ) -> None:
        _positive_int("in_channels", in_channels)
        _choice("layer_type", layer_type, _LAYER_TYPES)
        _positive_int("num_reynolds_layers", num_reynolds_layers)
        _choice("phi_mode", phi_mode, _PHI_MODES)
        phi_hidden_sizes = _int_list(
            "phi_hidden_sizes", [16, 16, 16] if phi_hidden_sizes is None else phi_hidden_sizes, allow_empty=True
        )
        if isinstance(design_order, bool) or not isinstance(design_order, int) or design_order not in (2, 3):
            raise ValueError(f"ReyNetConfig: design_order must be 2 (ordered pairs) or 3 (triples), got {design_order!r}")
        if design_order == 3 and layer_type == "reynolds" and (phi_mode != "joint" or not phi_hidden_sizes):
            raise ValueError(
                "ReyNetConfig: design_order=3 needs phi_mode='joint' and a non-empty phi_hidden_sizes (the triple "
                f"block is implemented for a joint φ with hidden layers), got phi_mode={phi_mode!r}, "
                f"phi_hidden_sizes={phi_hidden_sizes!r}"
            )
        if reynolds_channels is not None:
            _positive_int("reynolds_channels", reynolds_channels)
        if not isinstance(skip_connection, bool):
            raise ValueError(f"ReyNetConfig: skip_connection must be a bool, got {skip_connection!r}")
        channel_hidden_sizes = _int_list(
            "channel_hidden_sizes",
            [16, 32, 256] if channel_hidden_sizes is None else channel_hidden_sizes,
            allow_empty=layer_type == "reynolds",
        )
        _choice("pooling", pooling, _POOLINGS)
        head_hidden_sizes = _int_list(
            "head_hidden_sizes", [512, 256] if head_hidden_sizes is None else head_hidden_sizes, allow_empty=True
        )
        if isinstance(head_dropout, bool) or not isinstance(head_dropout, (int, float)) or not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"ReyNetConfig: head_dropout must be a float in [0, 1), got {head_dropout!r}")
        _choice("hidden_act", hidden_act, _ACTIVATIONS)
        _positive_int("num_targets", num_targets)
        _choice("initializer", initializer, ("xavier_uniform", "default"))
        if kwargs.get("problem_type") is not None:
            _choice("problem_type", kwargs["problem_type"], _PROBLEM_TYPES)

        self.in_channels = in_channels
        self.layer_type = layer_type
        self.num_reynolds_layers = num_reynolds_layers
        self.design_order = design_order
        self.phi_mode = phi_mode
        self.phi_hidden_sizes = phi_hidden_sizes
        self.reynolds_channels = reynolds_channels
        self.skip_connection = skip_connection
        self.channel_hidden_sizes = channel_hidden_sizes
        self.pooling = pooling
        self.head_hidden_sizes = head_hidden_sizes
        self.head_dropout = float(head_dropout)
        self.hidden_act = hidden_act
        self.num_targets = num_targets
        self.initializer = initializer
        super().__init__(**kwargs)

    @property
    def hidden_channels(self) -> int:
        """Channels of `last_hidden_state` (C' of the encoder output)."""
        if self.channel_hidden_sizes:
            return self.channel_hidden_sizes[-1]
        if self.phi_mode == "joint" and self.reynolds_channels is not None:
            return self.reynolds_channels
        return self.in_channels
