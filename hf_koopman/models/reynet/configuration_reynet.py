"""Configuration of ReyNet (Reynolds networks on graphs / 2-tensors). Imports only transformers (Hub remote code)."""

from __future__ import annotations

from transformers import PreTrainedConfig


__all__ = ["ReyNetConfig"]

_LAYER_TYPES = ("reynolds", "iegn")
_PHI_MODES = ("depthwise", "joint")
_POOLINGS = ("sum", "mean")
_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def _is_int(value: object) -> bool:
    """An int that is not a bool (`True` is an int to Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value < 1:
        hint = "; pass the number itself, not a string" if isinstance(value, str) else ""
        raise ValueError(f"ReyNetConfig: {name} must be a positive integer, got {value!r}{hint}")


def _int_list(name: str, value: object) -> None:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 1 for v in value):
        hint = f"; for one layer pass {name}=[{value}]" if _is_int(value) and value >= 1 else ""
        raise ValueError(f"ReyNetConfig: {name} must be a list of positive integers, got {value!r}{hint}")


def _as_list(value: object) -> object:
    """A list copy of a list or tuple (JSON reloads a list, so a saved and reloaded config compares equal); anything
    else as it is, for validate() to name."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _choice(name: str, value: object, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"ReyNetConfig: {name}={value!r} is not one of {options}")


def _num_labels(value: object) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"ReyNetConfig: num_labels must be an integer >= 1 (the outputs of ReyNetForGraphClassification), got "
            f"{value!r}; use num_labels=2 for binary classification or num_labels=1 with problem_type='regression'"
        )


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
            Invariant readout: `"sum"` of the diagonal and of the off-diagonal entries (the paper's
            `DiagOffdiagSumpool`) or their `"mean"` (divides by n and n(n−1); better for size generalisation).
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
        if kwargs.get("num_labels") is not None:
            # checked before PreTrainedConfig turns it into `id2label`, where -2 would silently become 0 labels
            _num_labels(kwargs["num_labels"])
        self.in_channels = in_channels
        self.layer_type = layer_type
        self.num_reynolds_layers = num_reynolds_layers
        self.design_order = design_order
        self.phi_mode = phi_mode
        self.phi_hidden_sizes = _as_list([16, 16, 16] if phi_hidden_sizes is None else phi_hidden_sizes)
        self.reynolds_channels = reynolds_channels
        self.skip_connection = skip_connection
        self.channel_hidden_sizes = _as_list([16, 32, 256] if channel_hidden_sizes is None else channel_hidden_sizes)
        self.pooling = pooling
        self.head_hidden_sizes = _as_list([512, 256] if head_hidden_sizes is None else head_hidden_sizes)
        self.head_dropout = head_dropout
        self.hidden_act = hidden_act
        self.num_targets = num_targets
        self.initializer = initializer
        super().__init__(**kwargs)
        self.validate()
        self.head_dropout = float(self.head_dropout)

    def validate(self) -> None:
        """Check every field (type, range, combination) and raise a `ValueError` naming the field, the value and the
        fix.

        Runs in `__init__`, in the models' `__init__` (which catches overrides applied after construction: transformers
        sets the keyword overrides of `from_pretrained(path, **kwargs)` with `setattr` after `__init__`) and in
        `save_pretrained`.
        """
        super().validate()
        _positive_int("in_channels", self.in_channels)
        _choice("layer_type", self.layer_type, _LAYER_TYPES)
        _positive_int("num_reynolds_layers", self.num_reynolds_layers)
        _choice("phi_mode", self.phi_mode, _PHI_MODES)
        _int_list("phi_hidden_sizes", self.phi_hidden_sizes)
        if not _is_int(self.design_order) or self.design_order not in (2, 3):
            raise ValueError(
                f"ReyNetConfig: design_order must be 2 (ordered pairs) or 3 (triples), got {self.design_order!r}"
            )
        if (self.design_order == 3 and self.layer_type == "reynolds"
                and (self.phi_mode != "joint" or not self.phi_hidden_sizes)):
            raise ValueError(
                "ReyNetConfig: design_order=3 needs phi_mode='joint' and a non-empty phi_hidden_sizes (the triple "
                f"block is implemented for a joint φ with hidden layers), got phi_mode={self.phi_mode!r}, "
                f"phi_hidden_sizes={self.phi_hidden_sizes!r}"
            )
        if self.reynolds_channels is not None:
            _positive_int("reynolds_channels", self.reynolds_channels)
        if not isinstance(self.skip_connection, bool):
            raise ValueError(f"ReyNetConfig: skip_connection must be a bool, got {self.skip_connection!r}")
        _int_list("channel_hidden_sizes", self.channel_hidden_sizes)
        if self.layer_type == "iegn" and not self.channel_hidden_sizes:
            raise ValueError(
                "ReyNetConfig: channel_hidden_sizes must not be empty with layer_type='iegn' (they are the widths of "
                "the IEGN layers); pass e.g. channel_hidden_sizes=[16, 32, 256]"
            )
        _choice("pooling", self.pooling, _POOLINGS)
        _int_list("head_hidden_sizes", self.head_hidden_sizes)
        dropout = self.head_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"ReyNetConfig: head_dropout must be a float in [0, 1), got {dropout!r}")
        _choice("hidden_act", self.hidden_act, _ACTIVATIONS)
        _positive_int("num_targets", self.num_targets)
        _choice("initializer", self.initializer, ("xavier_uniform", "default"))
        if self.problem_type is not None:
            _choice("problem_type", self.problem_type, _PROBLEM_TYPES)
        _num_labels(self.num_labels)

    @property
    def hidden_channels(self) -> int:
        """Channels of `last_hidden_state` (C' of the encoder output)."""
        if self.channel_hidden_sizes:
            return self.channel_hidden_sizes[-1]
        if self.phi_mode == "joint" and self.reynolds_channels is not None:
            return self.reynolds_channels
        return self.in_channels
