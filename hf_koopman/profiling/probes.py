"""Default probe inputs: what `profile(model)` feeds the model when the user gives no data.

Text models get the paper's synthetic-LM sequences (rksp_paper.md §3.1, App. D.2): a concatenation of segments of
three kinds, truncated to T tokens,

* repetition: a pattern of 2-5 tokens repeated 2-4 times,
* sequential: a run of 5-15 consecutive token ids,
* random: 5-15 i.i.d. tokens,

drawn from ids `{10, ..., V-1}` (the paper reserves the first 10 ids; for vocabularies smaller than 20 all ids are
used). T defaults to the paper's 256, capped by the model's maximum length. Vision models get standard-normal pixels
(the usual normalised-image scale); audio models get standard-normal waveforms / log-mel features.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


__all__ = [
    "NoDefaultProbeError",
    "default_num_samples",
    "default_probe_inputs",
    "max_sequence_length",
    "synthetic_token_sequences",
]


class NoDefaultProbeError(ValueError):
    """No synthetic probe exists for this model; `reason` says why, and the message adds the Python-API fix."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}. Pass inputs to profile(model, inputs) explicitly.")

_PAPER_SEQ_LEN = 256
_RESERVED_IDS = 10


def synthetic_token_sequences(
    num_sequences: int, seq_len: int, vocab_size: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Synthetic-LM token sequences (App. D.2): `(num_sequences, seq_len)` int64 ids in `[low, vocab_size)`."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to build probe sequences, got {vocab_size}.")
    if seq_len < 1 or num_sequences < 1:
        raise ValueError(f"need num_sequences >= 1 and seq_len >= 1, got {num_sequences} and {seq_len}.")
    low = _RESERVED_IDS if vocab_size >= 2 * _RESERVED_IDS else 0
    span = vocab_size - low

    def randint(a: int, b: int) -> int:  # inclusive bounds
        return int(torch.randint(a, b + 1, (1,), generator=generator))

    rows = []
    for _ in range(num_sequences):
        tokens: list[int] = []
        while len(tokens) < seq_len:
            kind = randint(0, 2)
            if kind == 0:  # repetition
                pattern = torch.randint(low, vocab_size, (randint(2, 5),), generator=generator).tolist()
                tokens += pattern * randint(2, 4)
            elif kind == 1:  # sequential run, wrapped inside the usable id range
                start, length = randint(low, vocab_size - 1), randint(5, 15)
                tokens += [low + (start - low + i) % span for i in range(length)]
            else:  # i.i.d.
                tokens += torch.randint(low, vocab_size, (randint(5, 15),), generator=generator).tolist()
        rows.append(tokens[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def hidden_width(model_or_config: Any) -> int | None:
    """The residual-stream width of the text config (`hidden_size`, `n_embd` or `d_model`), or `None` when it names
    none."""
    config = _config_of(model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = _get(text, "hidden_size", "n_embd", "d_model")
    return width if isinstance(width, int) and width > 0 else None


#: Token states N per layer at least, whatever the width: the paper's N (App. D).
DEFAULT_NUM_SAMPLES = 2048

#: N/d at which the sampling term sqrt(d/N) + d/N of Theorem 4 equals 1: phi^2 = (3 + sqrt 5) / 2 ~ 2.618. Fewer token
#: states per dimension leave the least-squares operator close to interpolating its sample.
SAMPLES_PER_DIM = (3 + math.sqrt(5)) / 2


def default_num_samples(model_or_config: Any = None) -> int:
    """Token states N per layer when `num_samples` is not given: the paper's 2048, or ceil(φ² d) ≈ 2.62 d for a
    residual stream wider than 782 (d = `hidden_width`), the fewest at which Theorem 4's sampling term
    sqrt(d/N) + d/N falls below 1. A fixed 2048 leaves every model wider than 1024 with N/d < 2, where the verdict is
    "uninformative" by construction (`DecisionRule.min_samples_per_dim`): d = 4096 (7B) gets 10724, GPT-2 small
    (d = 768) keeps 2048. A model or config that names no width gets 2048.

    Args:
        model_or_config (`PreTrainedModel`, `PretrainedConfig` or `int`, *optional*): the model, its config or the
            width d itself.
    """
    plain = isinstance(model_or_config, numbers.Integral) and not isinstance(model_or_config, bool)
    width = int(model_or_config) if plain else (
        hidden_width(model_or_config) if model_or_config is not None else None)
    if not width or width < 0:
        return DEFAULT_NUM_SAMPLES
    return max(DEFAULT_NUM_SAMPLES, math.ceil(SAMPLES_PER_DIM * width))


def max_sequence_length(model_or_config: Any) -> int | None:
    """The longest token sequence the model's position table can index, or `None` when nothing bounds it.

    `max_position_embeddings` (or `n_positions`, `max_seq_len`, `seq_length`) of the text config, less the offset of
    RoBERTa-style embeddings: their position ids start after `padding_idx` (`create_position_ids_from_input_ids`), so a
    position table with `padding_idx` p holds `num_embeddings - p - 1` usable positions (RoBERTa: 514 - 2 = 512).
    An embeddings module is RoBERTa-style when it carries the `padding_idx` of its `position_embeddings` table as its
    own attribute, which it passes to `create_position_ids_from_input_ids` (RoBERTa, XLM-R, ESM, MPNet, LayoutLMv3
    ...). A table with a `padding_idx` whose module counts positions from 0 (LXMERT: `padding_idx=0`, position ids
    `arange(T)`) keeps every position.
    """
    config = _config_of(model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = _get(text, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    limit = limit if isinstance(limit, int) and limit > 0 else None
    if isinstance(model_or_config, torch.nn.Module):
        for owner in model_or_config.modules():
            table = getattr(owner, "position_embeddings", None)
            padding = getattr(table, "padding_idx", None)
            if (isinstance(table, torch.nn.Embedding) and isinstance(padding, int) and padding >= 0
                    and getattr(owner, "padding_idx", None) == padding):
                usable = table.num_embeddings - padding - 1
                limit = usable if limit is None else min(limit, usable)
    return max(limit, 1) if limit is not None else None


def prompt_probe_length(model: Any) -> int | None:
    """The `seq_len` of a default probe that leaves room in the position table for the virtual tokens a PEFT
    prompt-learning `model` (possibly inside DDP / compile wrappers) puts in front of every row (prefix tuning's
    included); `None` (the default length) for other models and for models without a bounded position table."""
    from hf_koopman.profiling.blocks import unwrap_model
    from hf_koopman.profiling.inputs import virtual_tokens

    prompt = virtual_tokens(model, positions=True) if isinstance(model, torch.nn.Module) else 0
    limit = max_sequence_length(unwrap_model(model)) if prompt else None
    return None if limit is None else max(1, min(_PAPER_SEQ_LEN, limit - prompt))


_GRID_KEYS = ("grid_thw", "image_grid_thw")
_FEATURE_INPUTS = ("pixel_values", "hidden_states", "input_features", "input_values")


def _forward_params(model: Any) -> list[str]:
    import inspect

    forward = getattr(model, "forward", None)
    if forward is None:
        return []
    try:
        return list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return []


def _grid_key(model: Any) -> str | None:
    """Name of the `(num_images, 3)` patch-grid argument of packed-patch vision encoders (Qwen-VL style), if any."""
    params = _forward_params(model)
    return next((key for key in _GRID_KEYS if key in params), None)


def _main_input_name(model_or_config: Any) -> str:
    name = getattr(model_or_config, "main_input_name", None)
    params = _forward_params(model_or_config)
    if isinstance(name, str) and params and name not in params and params[0] in _FEATURE_INPUTS:
        # vision sub-towers often inherit `main_input_name = "input_ids"` from a base class although their forward
        # takes features: trust the signature
        return params[0]
    if isinstance(name, str):
        return name
    config = _config_of(model_or_config)
    if getattr(config, "vocab_size", None) is None and getattr(config, "image_size", None) is not None:
        return "pixel_values"
    return "input_ids"


def _packed_patch_inputs(
    config: Any, input_name: str, grid_key: str, num_tokens: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Probe for packed-patch vision encoders (Qwen2-VL family): patches of all images concatenated,
    `(P, C * t * p * p)`, with a `(num_images, 3)` grid of (frames, rows, columns) in patches. Each image is an 8 x 8
    patch grid (a multiple of every spatial merge size in use) with one temporal patch."""
    patch = _get(config, "patch_size", default=14)
    patch = patch if isinstance(patch, int) else int(patch[0])
    channels = _get(config, "in_channels", "num_channels", default=3)
    temporal = _get(config, "temporal_patch_size", default=1)
    side = 8
    images = max(1, math.ceil(num_tokens / (side * side)))
    width = channels * temporal * patch * patch
    out = {
        input_name: torch.randn(images * side * side, width, generator=generator),
        grid_key: torch.tensor([[1, side, side]] * images, dtype=torch.long),
    }
    return out


def _decoder_positions(config: Any) -> int:
    """Positions of a speech decoder (`max_target_positions`, Whisper's 448 when the config has none)."""
    return max(1, int(_get(config, "max_target_positions", default=448)))


def _decoder_probe(config: Any, batch: int, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """`decoder_input_ids` `(batch, T)` for a speech encoder-decoder (Whisper, Speech2Text): the decoder start token,
    then synthetic tokens (App. D.2), T = ceil(`num_tokens / batch`) up to the decoder's positions
    (`max_target_positions`). `default_probe_inputs` sizes the audio batch so that `batch * T >= num_tokens`: the
    decoder blocks then see at least `num_tokens` token states. A constant start token everywhere would give the
    decoder a few distinct states only.
    """
    start = _get(config, "decoder_start_token_id", default=0)
    vocab = _get(config, "vocab_size")
    length = max(1, min(_decoder_positions(config), math.ceil(num_tokens / batch)))
    if not isinstance(vocab, int) or vocab < 2 or length == 1:
        return torch.full((batch, length), start)
    ids = synthetic_token_sequences(batch, length, vocab, generator=generator)
    ids[:, 0] = start
    return ids


def is_dual_encoder(config: Any) -> bool:
    """Whether `config` is a contrastive dual encoder's (CLIP, SigLIP, ALIGN ...): a text and a vision config, and no
    image placeholder token (which marks a vision-language generator such as LLaVA). Its forward runs both towers."""
    return (getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None
            and not any(hasattr(config, key) for key in ("image_token_id", "image_token_index")))


def _image_geometry(vision: Any) -> tuple[int, int, int]:
    """`(image size, channels, tokens per image)` of a vision config (224 px, 3 channels, 16 px patches when it does
    not say). The tokens are those of the stage with the fewest: the patches, and for a hierarchical model (a patch
    size and a list of stage `depths`: ConvNeXt, Swin, FocalNet, Hiera, PoolFormer) its last stage's, from the stem's
    stride (`patch_stride`, `strides[0]`, else the patch size), each stage after the first assumed to merge 2 x 2
    tokens (a model that merges more gets fewer tokens than asked for at its last stage, and the report says so)."""
    size = _get(vision, "image_size", default=224)
    size = size if isinstance(size, int) else int(size[0]) if isinstance(size, (list, tuple)) else 224
    patch = _get(vision, "patch_size", default=16)
    patch = patch if isinstance(patch, int) else int(patch[0]) if isinstance(patch, (list, tuple)) else 16
    channels = _get(vision, "num_channels", default=3)
    tokens = max((size // max(patch, 1)) ** 2, 1)
    stages = _get(vision, "depths")
    # patch-based hierarchies only: a CNN's stages (ResNet, RegNet) have no patch size, and their blocks change width;
    # a super-resolution model (Swin2SR: 1-px patches, `upscale`) keeps every token at every stage
    stem = next((first for key in ("patch_stride", "strides") if (first := _first_int(_get(vision, key)))), patch)
    if (isinstance(stages, (list, tuple)) and len(stages) > 1 and _get(vision, "patch_size") is not None and stem > 1
            and _get(vision, "upscale") is None):
        tokens = max((size // stem) ** 2 // 4 ** (len(stages) - 1), 1)
    return size, channels, tokens


def _first_int(value: Any) -> int | None:
    """`value` if it is an int, its first entry if it is a list or tuple of ints (a per-stage or per-axis setting)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _image_batch(num_tokens: int, per_image: int) -> int:
    """Images that give at least `num_tokens` patch tokens at `per_image` each, at most 64 (a bound on the pixel
    memory for tiny patch grids)."""
    return max(1, min(64, math.ceil(num_tokens / per_image)))


def default_probe_inputs(
    model_or_config: Any,
    *,
    num_tokens: int = 2048,
    seed: int = 0,
    seq_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Probe batch for a model with no user data.

    Args:
        model_or_config (`PreTrainedModel` or `PretrainedConfig`):
            The model (preferred: its `main_input_name` decides text / vision / audio) or its config.
        num_tokens (`int`, *optional*, defaults to 2048):
            Minimum number of token states the batch produces per layer (the default `N` of App. D).
        seed (`int`, *optional*, defaults to 0):
            Seed of the probe generator.
        seq_len (`int`, *optional*):
            Text sequence length; defaults to 256 (App. D.2), capped by the model's maximum positions.

    Returns:
        `dict[str, torch.Tensor]`: a batch for `model(**batch)`: `input_ids` `(B, T)` + `attention_mask` for text
        (+ `decoder_input_ids` for encoder-decoder models, + `bbox` `(B, T, 4)` for layout models whose forward takes
        boxes, + `pixel_values` `(B, C, H, W)` for contrastive dual encoders such as CLIP, with B large enough that
        each tower gets at least `num_tokens` token states, B <= 64 images unless the text needs more rows),
        `pixel_values` `(B, C, H, W)` for vision (`(B, T, C, H, W)` clips when the config has `num_frames`),
        flattened patches `(P, C * t * p * p)` + `grid_thw` `(num_images, 3)` for packed-patch vision encoders
        (Qwen-VL style), `input_values` `(B, S)` or `input_features` `(B, M, F)` for audio (+ `decoder_input_ids`
        `(B, T)` for speech encoder-decoders, T up to `max_target_positions`, with B large enough that the decoder
        gets at least `num_tokens` token states too: B >= ceil(`num_tokens` / `max_target_positions`)). The input
        kind follows the model's forward signature when its `main_input_name` is not one of the forward's arguments.
    """
    if num_tokens < 2:
        raise ValueError(f"num_tokens must be >= 2, got {num_tokens}.")
    generator = torch.Generator().manual_seed(seed)
    config = _config_of(model_or_config)
    input_name = _main_input_name(model_or_config)

    grid_key = _grid_key(model_or_config)
    if grid_key is not None and input_name in ("pixel_values", "hidden_states"):
        return _packed_patch_inputs(config, input_name, grid_key, num_tokens, generator)
    if input_name == "pixel_values":
        vision = _get(config, "vision_config", default=config)
        size, channels, per_image = _image_geometry(vision)
        frames = _get(vision, "num_frames")
        if isinstance(frames, int) and frames > 0:
            # video transformers (TimeSformer, VideoMAE, ViViT) take `(B, T, C, H, W)` clips
            batch = max(1, min(64, math.ceil(num_tokens / (per_image * frames))))
            return {"pixel_values": torch.randn(batch, frames, channels, size, size, generator=generator)}
        batch = _image_batch(num_tokens, per_image)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}
    mels, spectrogram_frames = _get(config, "num_mel_bins"), _get(config, "max_length")
    if input_name == "input_values" and isinstance(mels, int) and isinstance(spectrogram_frames, int):
        # spectrogram transformers (AST) take `(B, frames, mel bins)` and cut them into overlapping patches
        patch = _get(config, "patch_size", default=16)
        f_stride, t_stride = _get(config, "frequency_stride", default=patch), _get(config, "time_stride", default=patch)
        per_example = max(1, ((mels - patch) // f_stride + 1) * ((spectrogram_frames - patch) // t_stride + 1))
        batch = max(1, min(64, math.ceil(num_tokens / per_example)))
        return {"input_values": torch.randn(batch, spectrogram_frames, mels, generator=generator)}
    if input_name == "input_values":  # raw waveform models (wav2vec2, hubert, ...)
        length = 16000
        return {"input_values": torch.randn(max(1, math.ceil(num_tokens / 50)), length, generator=generator)}
    if input_name == "input_features":  # log-mel models (whisper, speech2text, ...)
        mels = _get(config, "num_mel_bins", "feature_size", "input_feat_per_channel", default=80)
        frames = 2 * _get(config, "max_source_positions", default=1500)
        batch = max(1, math.ceil(num_tokens / (frames // 2)))
        decoder = getattr(config, "is_encoder_decoder", False)
        if decoder:
            # enough rows that the decoder, at most `max_target_positions` tokens a row, gets `num_tokens` as well
            # (Whisper: 448 positions against 1500 encoder frames: 5 rows at the default 2048, where the encoder
            # alone needs 2)
            batch = max(batch, math.ceil(num_tokens / _decoder_positions(config)))
        features = torch.randn(batch, mels, frames, generator=generator)
        out: dict[str, torch.Tensor] = {"input_features": features}
        if decoder:
            out["decoder_input_ids"] = _decoder_probe(config, batch, num_tokens, generator)
        return out

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = _get(text, "vocab_size")
    if not isinstance(vocab, int):
        raise NoDefaultProbeError(
            f"cannot build default probe tokens for {type(config).__name__}: it has no integer vocab_size"
        )
    max_len = max_sequence_length(model_or_config)
    length = seq_len or _PAPER_SEQ_LEN
    if isinstance(max_len, int) and max_len > 0:
        length = min(length, max_len)
    num_sequences = max(1, math.ceil(num_tokens / length))
    vision, dual = getattr(config, "vision_config", None), is_dual_encoder(config)
    if dual:
        # contrastive dual encoders (CLIP, SigLIP, ALIGN ...) need both towers' inputs in one forward; vision-language
        # generators (LLaVA ...) are probed text-only, since images there need placeholder tokens. Each tower gets
        # `num_tokens` token states: the images are counted by patches per image, as for a vision model (CLIP
        # ViT-B/32: 42 images of 49 patches, where the 27 text rows of 77 tokens would give 1323), and the text rows
        # match the images, since some of these models pair text row i with image i (BLIP, FLAVA)
        size, channels, per_image = _image_geometry(vision)
        num_sequences = max(num_sequences, _image_batch(num_tokens, per_image))
    ids = synthetic_token_sequences(num_sequences, length, vocab, generator=generator)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if dual:
        out["pixel_values"] = torch.randn(num_sequences, channels, size, size, generator=generator)
    if "bbox" in _forward_params(model_or_config):
        # document-layout models (LayoutLM, LiLT, BROS, UDOP) embed one box per token; some refuse to run without one.
        # Boxes are valid (x0 <= x1, y0 <= y1) on the usual 0-1000 page scale
        corners = torch.randint(0, 1001, (num_sequences, length, 2, 2), generator=generator).sort(dim=2).values
        out["bbox"] = corners.reshape(num_sequences, length, 4)  # (x0, y0, x1, y1): min corner, then max corner
    if getattr(config, "is_encoder_decoder", False):
        # the decoder stack is probed with the same sequences (teacher forcing on the probe itself)
        out["decoder_input_ids"] = ids.clone()
        out["decoder_attention_mask"] = torch.ones_like(ids)
    return out
