"""Turn whatever the user passes to `profile(model, inputs)` into an iterator of model-ready batch dicts."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from hf_koopman.logging_utils import get_logger
from hf_koopman.profiling.blocks import unwrap_model
from hf_koopman.profiling.probes import _FEATURE_INPUTS


__all__ = [
    "POSITIONAL_INPUT", "add_decoder_inputs", "iter_batches", "label_mask", "labels_feed_decoder", "mask_routes",
    "peft_model", "prepare_batch", "byte_tokenize", "snapshot_masks", "split_text", "virtual_tokens",
    "with_virtual_tokens",
]

logger = get_logger(__name__)

# keys that only feed the loss; the residual stream does not depend on them
_LABEL_KEYS = ("labels", "label", "label_ids", "start_positions", "end_positions")
_TEXT_COLUMNS = ("text", "content", "sentence", "document")
# per-token keys a tokenizer returns next to `input_ids`: padded and batched together with it
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# batch key of a tensor that `profile()` passes positionally: plain `nn.Module`s have no keyword convention
POSITIONAL_INPUT = "*args"
# config keys `<prefix>..._token_id` of multimodal placeholder tokens, which may lie outside the text vocabulary
_PLACEHOLDER_PREFIXES = ("image", "video", "audio", "vision", "boi", "eoi", "boa", "eoa")
_PLACEHOLDER_SUFFIXES = ("_token_id", "_token_index")


def byte_tokenize(texts: list[str], vocab_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """Fallback tokenisation when no tokenizer is available: UTF-8 bytes (+1, id 0 is padding) modulo the vocabulary.

    Only meant for profiling *randomly initialised* models from an embedded config, where no trained tokenizer exists;
    the ids carry the text's byte statistics, which is all an untrained embedding can see.
    """
    rows = [[1 + (b % max(vocab_size - 1, 1)) for b in text.encode("utf-8")][:max_length] or [1] for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def split_text(text: str, max_length: int, chars_per_token: int = 4) -> list[str]:
    """A long text as pieces of about one sequence each (`max_length` tokens at `chars_per_token` characters per
    token), so that a document fills several rows instead of being truncated to one; blank pieces are dropped."""
    width = max(1, chars_per_token * max_length)
    return [piece for piece in (text[i : i + width] for i in range(0, len(text), width)) if piece.strip()]


def _tokenize(
    texts: list[str], tokenizer: Any, model: Any, max_length: int, first: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenise one batch of texts; `first` is True for the first batch of a `profile()` call (warns once)."""
    if tokenizer is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            raise ValueError(
                "text inputs need a tokenizer: pass "
                "profile(model, texts, tokenizer=AutoTokenizer.from_pretrained(...))."
            )
        if first:
            logger.warning("no tokenizer given: the text is encoded as byte-level ids, which only a randomly "
                           "initialised model reads like any other ids; pass "
                           "tokenizer=AutoTokenizer.from_pretrained(...) for a trained one")
        return byte_tokenize(texts, vocab, max_length)
    if getattr(tokenizer, "pad_token", "x") is None:
        # GPT-2 style tokenizers ship without a pad token: pad with the EOS id here rather than setting
        # `tokenizer.pad_token`, which would change the caller's tokenizer
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        rows = [{k: encoded[k][i] for k in _TOKEN_KEYS if k in encoded} for i in range(len(texts))]
        left = getattr(tokenizer, "padding_side", "right") == "left"
        return _pad_rows(rows, getattr(tokenizer, "eos_token_id", None) or 0, left=left)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(encoded)


def _pad_rows(rows: list[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Collate dataset rows with variable-length `input_ids` into padded tensors + attention mask (right-padded unless
    `left`)."""
    lengths = [len(r["input_ids"]) for r in rows]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if not all(hasattr(v, "__len__") and len(v) == n for v, n in zip(values, lengths)):
            continue  # scalar / non-sequence columns are not model inputs for profiling
        fill = pad_id if key == "input_ids" else 0
        tensor = torch.full((len(rows), width), fill, dtype=torch.long)
        for i, v in enumerate(values):
            start = width - len(v) if left else 0
            tensor[i, start : start + len(v)] = torch.as_tensor(v, dtype=torch.long)
        out[key] = tensor
    if "attention_mask" not in out:
        valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        out["attention_mask"] = (valid.flip(1) if left else valid).long()
    return out


def _pad_labels(values: list[Any]) -> torch.Tensor | None:
    """Token label sequences of one chunk padded with -100 (as `DataCollatorForSeq2Seq` pads them) into `(B, T)`;
    `None` when they are not sequences of ints (class labels, floats)."""
    if not values or not all(hasattr(v, "__len__") and len(v) > 0 for v in values):
        return None
    try:
        rows = [torch.as_tensor(v) for v in values]
    except (TypeError, ValueError):
        return None
    if any(r.dim() != 1 or r.is_floating_point() for r in rows):
        return None
    out = torch.full((len(rows), max(len(r) for r in rows)), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _batch_from_mapping(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A batch dict with tensor `input_ids`: lists / arrays of token ids (a tokenizer called without
    `return_tensors="pt"`) are padded into tensors with an attention mask, and a single 1-D sequence gets a batch
    dimension."""
    out = dict(batch)
    for key in _TOKEN_KEYS:
        if isinstance(out.get(key), np.ndarray):
            out[key] = torch.from_numpy(out[key])
    ids = out.get("input_ids")
    if isinstance(ids, (list, tuple)) and ids:
        keys = [k for k in _TOKEN_KEYS if isinstance(out.get(k), (list, tuple)) and len(out[k]) == len(ids)]
        if not isinstance(ids[0], (list, tuple, np.ndarray, torch.Tensor)):  # one sequence: `tokenizer(text)`
            rows = [{k: out[k] for k in keys}]
        else:
            rows = [{k: out[k][i] for k in keys} for i in range(len(ids))]
        out.update(_pad_rows(rows, pad_id=0))  # pad id 0 is safe: the attention mask hides the padding
    elif isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point():
        logger.info("input_ids is a 1-D tensor of %d token ids: profiling it as one sequence", ids.numel())
        for key in _TOKEN_KEYS:
            if isinstance(out.get(key), torch.Tensor) and out[key].dim() == 1:
                out[key] = out[key][None]
    return out


def _batch_from_tensor(inputs: torch.Tensor, model: Any) -> dict[str, Any]:
    """Batch dict of a bare tensor: the model's main input (`main_input_name`: pixel values, audio features, token
    ids ...), so that an integer image tensor reaches `prepare_batch` as `pixel_values` and fails there with the fix;
    token ids for an integer tensor of a text model; a model that is not a `PreTrainedModel` (no `main_input_name`)
    and takes no such keyword gets the tensor positionally."""
    from hf_koopman.profiling.probes import _main_input_name

    if not isinstance(getattr(model, "main_input_name", None), str):
        # the keywords a wrapper of a PreTrainedModel passes on; a forward taking neither gets the tensor positionally
        key = "pixel_values" if inputs.is_floating_point() else "input_ids"
        if not _accepts(model, key, via_kwargs=True):  # e.g. forward(self, x): a plain nn.Module
            return {POSITIONAL_INPUT: inputs}
        if inputs.is_floating_point():
            return {key: inputs}
    main = _main_input_name(model)
    if main == "input_values" and inputs.dim() == 1 and inputs.is_floating_point():
        logger.info("input_values is a 1-D waveform of %d samples: profiling it as one example", inputs.numel())
        inputs = inputs[None]  # a raw-audio model takes (batch, samples)
    if inputs.is_floating_point() or main in _FEATURE_INPUTS:
        return {main: inputs}
    return _batch_from_mapping({"input_ids": inputs})


def _check_embeddings(embeds: Any, model: torch.nn.Module) -> None:
    """Raise a `ValueError` naming the fix when `inputs_embeds` is not `(..., sequence, width)` (3-D, or 4-D for
    multiple choice) with the width of the model's input embedding."""
    if not isinstance(embeds, torch.Tensor):
        return
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    width = getattr(embedding, "embedding_dim", None)
    if embeds.dim() < 3 or not embeds.numel() or (isinstance(width, int) and embeds.shape[-1] != width):
        raise ValueError(
            f"inputs_embeds has shape {tuple(embeds.shape)}; {type(model).__name__} takes (batch, sequence, "
            f"{width if isinstance(width, int) else 'hidden size'}) (multiple choice: (batch, choices, sequence, "
            "width)) with at least one position: pass model.get_input_embeddings()(input_ids), or input_ids "
            "themselves."
        )


def _check_feature_inputs(batch: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Raise a `ValueError` naming the fix when pixel values or audio features are not floating point (a uint8 image
    tensor, say): the model would fail deep inside its forward, or read them as something else."""
    for key in _FEATURE_INPUTS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex():
            processor = "AutoImageProcessor" if key == "pixel_values" else "AutoFeatureExtractor"
            raise ValueError(
                f"{type(model).__name__} takes floating-point {key}, got a {str(value.dtype).removeprefix('torch.')} "
                f"tensor of shape {tuple(value.shape)}; pass the output of the model's processor "
                f"({processor}.from_pretrained(<model id>)(..., return_tensors='pt')), or convert and normalise it "
                f"yourself as the processor does (e.g. images: x.float() / 255, then the processor's mean and std) "
                f"and pass inputs={{'{key}': x}}."
            )


def _dataset_chunks(dataset: Any, batch_size: int, rows: Iterator[dict] | None) -> Iterator[dict[str, list]]:
    """Column dicts of `batch_size` rows each: slices of a `datasets.Dataset`, or rows of an `IterableDataset` (or of
    `rows`, when given) taken lazily, so that reading stops once `profile()` has enough tokens."""
    if rows is None and hasattr(dataset, "__len__"):
        for start in range(0, len(dataset), batch_size):
            yield dataset[start : start + batch_size]
        return
    rows = iter(dataset) if rows is None else rows
    while chunk := list(itertools.islice(rows, batch_size)):
        yield {key: [row[key] for row in chunk] for key in chunk[0]}


def _column_dtype(dataset: Any, column: str) -> torch.dtype | None:
    """The torch dtype a `datasets` column declares (`Value("uint8")`, nested in `List` / `Sequence`, or an `ArrayND`
    dtype), or `None` when the features are unknown or name no torch dtype."""
    feature = (getattr(dataset, "features", None) or {}).get(column)
    while feature is not None and not isinstance(getattr(feature, "dtype", None), str):
        feature = getattr(feature, "feature", None)
    dtype = getattr(torch, getattr(feature, "dtype", ""), None) if feature is not None else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _pixel_tensor(values: Any, declared: torch.dtype | None) -> torch.Tensor:
    """One batch of a dataset's `pixel_values` as a tensor of the dtype the rows hold (the column's `declared` dtype
    when the rows come as Python lists), so that integer pixels reach `prepare_batch` as integers and are refused
    there with the fix, as an integer tensor passed directly is."""
    if isinstance(values, torch.Tensor):
        tensor = values
    elif isinstance(values, (list, tuple)) and values and isinstance(values[0], torch.Tensor):
        tensor = torch.stack(list(values))
    elif isinstance(values, (list, tuple)) and values and isinstance(values[0], np.ndarray):
        tensor = torch.from_numpy(np.stack(values))
    else:
        tensor = torch.as_tensor(values)  # a NumPy array keeps its dtype; Python ints give int64, floats float32
    return tensor.to(declared) if declared is not None and tensor.dtype != declared else tensor


#: inputs of another modality: a batch that holds one besides a text column is not a text batch (an image-caption or
#: speech batch's text is its target)
_NON_TEXT_INPUTS = ("input_ids", "inputs_embeds", "pixel_values_videos", *_FEATURE_INPUTS)


def _text_batch(batch: Mapping[str, Any]) -> list[str] | None:
    """The texts of an untokenised batch (`{"text": [...]}`, as a DataLoader over a text dataset collates it, with
    labels or an index beside it): a text column (`_TEXT_COLUMNS`) holding strings and no model input of its own
    (`_NON_TEXT_INPUTS`); else None."""
    if any(key in batch for key in _NON_TEXT_INPUTS):
        return None
    column = next((c for c in _TEXT_COLUMNS if c in batch), None)
    texts = batch.get(column) if column is not None else None
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        return [t for t in texts if t.strip()] or None
    return None


def _iter_dataset(dataset: Any, tokenizer: Any, model: Any, batch_size: int, max_length: int) -> Iterator[dict]:
    columns = list(dataset.column_names or [])
    rows = None
    if not columns:  # an IterableDataset whose features are unknown until read: take them from its first row
        rows = iter(dataset)
        first = next(rows, None)
        if first is None:
            return
        columns = list(first)
        rows = itertools.chain([first], rows)
    if "input_ids" in columns or "pixel_values" in columns:
        keep = [c for c in columns if c not in _LABEL_KEYS]
        # an encoder-decoder trains its decoder on the labels: keep token labels for `add_decoder_inputs`
        seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        labels = "labels" if seq2seq and "labels" in columns and "input_ids" in columns else None
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        # the stored dtype, unless a transform (`with_transform`) turns the stored pixels into what the model gets
        custom = (getattr(dataset, "format", None) or {}).get("type") == "custom"
        declared = None if custom else _column_dtype(dataset, "pixel_values")
        for chunk in _dataset_chunks(dataset, batch_size, rows):
            if "pixel_values" in keep:
                yield {"pixel_values": _pixel_tensor(chunk["pixel_values"], declared)}
            else:
                rows = [{k: chunk[k][i] for k in keep} for i in range(len(chunk["input_ids"]))]
                batch = _pad_rows(rows, pad_id)
                padded = _pad_labels(chunk[labels]) if labels is not None else None
                if padded is not None:
                    batch["labels"] = padded
                yield batch
        return
    text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_column is None:
        raise ValueError(
            f"cannot profile on a Dataset with columns {columns}: it needs `input_ids` (tokenised), `pixel_values`, "
            f"or a text column named one of {_TEXT_COLUMNS}. For other inputs (audio `input_values` / "
            "`input_features` of different lengths, ...), pass batches the model takes: a DataLoader with your "
            "collator (DataLoader(dataset, batch_size=8, collate_fn=collator)), or a dict of tensors."
        )
    texts: list[str] = []
    first = True
    for text in dataset[text_column] if rows is None else (row[text_column] for row in rows):
        if text and text.strip():
            texts.append(text)
        if len(texts) == batch_size:
            yield _tokenize(texts, tokenizer, model, max_length, first)
            texts, first = [], False
    if texts:
        yield _tokenize(texts, tokenizer, model, max_length, first)


def iter_batches(
    inputs: Any, *, model: Any, tokenizer: Any = None, batch_size: int = 8, max_length: int = 256
) -> Iterator[dict[str, Any]]:
    """Yield batch dicts from a batch dict / `BatchEncoding`, a tensor, text(s), a `datasets.Dataset` or any iterable
    of batch dicts or tensors (e.g. a `DataLoader`); a batch of texts (`{"text": [...]}`) is tokenised."""
    if isinstance(inputs, Mapping):
        texts = _text_batch(inputs)
        yield _batch_from_mapping(inputs) if texts is None else _tokenize(texts, tokenizer, model, max_length)
        return
    if isinstance(inputs, torch.Tensor):
        yield _batch_from_tensor(inputs, model)
        return
    if isinstance(inputs, str):  # one document: about one sequence per piece (a byte-level id per character)
        inputs = split_text(inputs, max_length, 4 if tokenizer is not None else 1) or [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        for start in range(0, len(inputs), batch_size):
            yield _tokenize(list(inputs[start : start + batch_size]), tokenizer, model, max_length, start == 0)
        return
    if hasattr(inputs, "column_names") and hasattr(inputs, "__getitem__"):  # datasets.Dataset without importing it
        yield from _iter_dataset(inputs, tokenizer, model, batch_size, max_length)
        return
    if isinstance(inputs, Iterable):
        first = True
        for batch in inputs:
            if isinstance(batch, (list, tuple)) and len(batch) == 1 and isinstance(batch[0], torch.Tensor):
                batch = batch[0]  # DataLoader(TensorDataset(x)) yields [x_batch]
            if isinstance(batch, torch.Tensor):  # as a bare tensor: the model's main input, or positional
                yield _batch_from_tensor(batch, model)
                continue
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"profile() iterates over batches and expects each to be a mapping of tensors (or a tensor), got "
                    f"{type(batch).__name__}; use a DataLoader whose collator returns dicts (text: "
                    "DataCollatorWithPadding; images or audio: the model's processor with return_tensors='pt'), or "
                    "wrap each batch as {input name: tensor}."
                )
            texts = _text_batch(batch)
            if texts is not None:  # a DataLoader over a text dataset: tokenised here, as a list of texts is
                yield _tokenize(texts, tokenizer, model, max_length, first)
            else:
                yield _batch_from_mapping(batch)
            first = False
        return
    raise TypeError(
        f"unsupported inputs of type {type(inputs).__name__}: pass a batch dict, a tensor, text or a list of texts "
        "(with tokenizer=), a datasets.Dataset, a DataLoader, or None for the default synthetic probe."
    )


def _accepts(model: torch.nn.Module, name: str, *, via_kwargs: bool = False) -> bool:
    """Whether `model.forward` takes the keyword `name`: a parameter of that name, or with `via_kwargs` also
    `**kwargs`. An unreadable signature counts as `via_kwargs` (the keyword call of a `PreTrainedModel`)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return via_kwargs
    return any(p.name == name or (via_kwargs and p.kind is inspect.Parameter.VAR_KEYWORD) for p in params)


def _embedding_rows(model: torch.nn.Module) -> int | None:
    """Ids the model's input embedding can look up, if it has one: its rows (more than `config.vocab_size` when resized
    by hand) plus any decoupled extra rows (`num_additional_embeddings`, e.g. IDEFICS)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embedding, "num_embeddings", None)
    extra = getattr(embedding, "num_additional_embeddings", 0)
    return rows + (extra if isinstance(extra, int) else 0) if isinstance(rows, int) else None


def _check_token_ids(ids: torch.Tensor, model: torch.nn.Module) -> None:
    """Raise a `ValueError` naming the fix when `input_ids` cannot index the model's embedding (float values, a single
    number, no tokens, ids beyond the vocabulary); the forward pass would fail deep inside torch instead. Negative ids
    are left to the forward (remote-code vision-language models map negative placeholders themselves); the index
    error of a model that does not is explained after it (`profiler._index_error`)."""
    name = type(model).__name__
    if ids.is_floating_point():
        embeds = " or embeddings as inputs={'inputs_embeds': x}" if _accepts(model, "inputs_embeds") else ""
        raise ValueError(
            f"{name} takes integer token ids (input_ids), got a {str(ids.dtype).removeprefix('torch.')} tensor of "
            f"shape {tuple(ids.shape)}; pass token ids from the model's tokenizer "
            f"(tokenizer(texts, return_tensors='pt')){embeds}."
        )
    if ids.dim() == 0 or not ids.numel():
        what = "a single number (a 0-d tensor)" if ids.dim() == 0 else f"no tokens (shape {tuple(ids.shape)})"
        raise ValueError(f"input_ids holds {what}; pass a (batch, sequence) tensor of token ids with at least one "
                         "token per row, e.g. tokenizer(texts, return_tensors='pt')['input_ids'].")
    if ids.device.type == "meta":
        raise ValueError("input_ids are on the meta device and hold no values; pass real token ids (on the CPU or the "
                         "model's device).")
    if ids.dtype == torch.bool:
        return
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0 or int(ids.max()) < vocab:
        return
    # multimodal models swap placeholder ids (e.g. config.image_token_id) out before the embedding: those are fine
    special = [
        value
        for key, value in getattr(model.config, "__dict__", {}).items()
        if isinstance(value, int) and key.startswith(_PLACEHOLDER_PREFIXES) and key.endswith(_PLACEHOLDER_SUFFIXES)
    ]
    regular = ids[~torch.isin(ids, torch.tensor(special, dtype=ids.dtype, device=ids.device))] if special else ids
    bound = max(vocab, _embedding_rows(model) or 0)
    if regular.numel() and int(regular.max()) >= bound:
        raise ValueError(
            f"input_ids holds token id {int(regular.max())} but {name} has a vocabulary of {bound} tokens (ids "
            f"0..{bound - 1}); the tokenizer does not match the model: tokenize with the tokenizer of the model's own "
            "checkpoint (AutoTokenizer.from_pretrained(<model id>))."
        )


def _token_label_grid(labels: Any) -> bool:
    """Whether `labels` is an integer `(B, T)` tensor: token labels (or `(B, 1)` class labels), not float targets, a
    boolean mask or `(B,)` class labels."""
    return (isinstance(labels, torch.Tensor) and labels.dim() == 2
            and not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool))


def _decoder_ids_from_labels(batch: Mapping[str, Any], model: torch.nn.Module) -> torch.Tensor | None:
    """The decoder inputs an encoder-decoder `model` builds from the token labels of `batch` in training, or `None`.

    `None` unless the model is an encoder-decoder, `batch` has no `decoder_input_ids` / `decoder_inputs_embeds` and
    its labels are integer `(B, T)` tokens (`T > 1`; class labels `(B,)` / `(B, 1)` are not). The ids are the model's
    `prepare_decoder_input_ids_from_labels` (the labels shifted right, -100 replaced by the pad token), or the same
    shift done here from the config's `decoder_start_token_id` and `pad_token_id` for models without that method
    (Whisper, Speech2Text shift inside their forward) when the model's forward takes `labels`; `None` otherwise."""
    labels = batch.get("labels")
    if not (getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            and "decoder_input_ids" not in batch and "decoder_inputs_embeds" not in batch
            and _token_label_grid(labels) and labels.shape[1] > 1):
        return None
    method = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(method):
        try:
            return method(labels=labels)
        except (ValueError, TypeError, AttributeError):  # e.g. an EncoderDecoderModel without decoder_start_token_id
            pass
    start, pad = getattr(model.config, "decoder_start_token_id", None), getattr(model.config, "pad_token_id", None)
    if not isinstance(start, int) or not isinstance(pad, int) or not _accepts(model, "labels"):
        return None  # a base model (T5Model) takes no labels: in training its decoder never sees them
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad)


def labels_feed_decoder(batch: Mapping[str, Any], model: torch.nn.Module) -> bool:
    """Whether an encoder-decoder `model` given `batch` builds its decoder inputs from the token labels, as in training
    (`_decoder_ids_from_labels`); `prepare_batch` then does the same, and the decoder's padding is `labels != -100`."""
    return _decoder_ids_from_labels(batch, model) is not None


def _warn_unmasked_padding(ids: torch.Tensor, model: torch.nn.Module) -> None:
    """Warn (once per message) when `(B, T)` token ids without an attention mask hold runs of the model's
    `pad_token_id` at the ends of sequences: without the mask those positions are profiled as tokens. A run of two
    or more is required, so that a single end-of-sequence token that doubles as the pad token (GPT-2) is no alarm."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if not isinstance(pad, int) or ids.dim() != 2 or ids.shape[-1] < 2:
        return
    padded = ((ids[:, -2:] == pad).all(dim=1) | (ids[:, :2] == pad).all(dim=1)).any()
    if bool(padded):
        logger.warning_once(
            f"input_ids hold runs of the pad token ({pad}, config.pad_token_id of {type(model).__name__}) at the ends "
            "of sequences and no attention_mask was given: those positions are profiled as tokens. Pass the "
            "attention_mask the tokenizer returns with the ids (tokenizer(texts, padding=True, return_tensors='pt')), "
            "or unpadded sequences."
        )


def prepare_batch(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Check `input_ids` against the model's vocabulary, drop label keys, move tensors to the model's device (floats to
    its dtype) and add decoder inputs for encoder-decoder models that have none (`add_decoder_inputs`): the labels
    shifted right where the batch has token labels (as in training), else the encoder's tokens, else (a speech
    encoder) synthetic decoder tokens after the decoder start token, up to the decoder's positions."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(ids, torch.Tensor):
        _check_token_ids(ids, model)
        if mask is None:
            _warn_unmasked_padding(ids, model)
        # the mask's rows may differ by design (MusicGen: one row per example for its codebooks' rows; a (1, T)
        # mask broadcasts), its length may not: a mask of other positions would mark the wrong tokens as padding
        if (isinstance(mask, torch.Tensor) and ids.dim() >= 2 and mask.dim() == 2
                and mask.shape[-1] != ids.shape[-1]):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}: it covers "
                f"{mask.shape[-1]} positions, not {ids.shape[-1]}. The mask marks each token as real (1) or padding "
                "(0): pass the mask the tokenizer returned with the ids (tokenizer(texts, padding=True, "
                "return_tensors='pt'))."
            )
    _check_embeddings(batch.get("inputs_embeds"), model)
    _check_feature_inputs(batch, model)
    params = list(itertools.islice(model.parameters(), 1))
    dtype = params[0].dtype if params else torch.float32
    # the first materialised parameter's device: parameters that accelerate offloads (`device_map` with CPU / disk
    # offload, `cpu_offload`) sit on `meta` until their hook loads them, and inputs on `meta` would hold no data
    param = next((p for p in model.parameters() if p.device.type != "meta"), None)
    device = param.device if param is not None else torch.device("cpu")
    out = {}
    for key, value in batch.items():
        if key in _LABEL_KEYS:
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        out[key] = value
    if "use_cache" not in out and _accepts(model, "use_cache"):
        out["use_cache"] = False  # a diagnostic forward needs no KV cache (and some hybrid caches need a prefill)
    return add_decoder_inputs(out, batch, model, device)


def add_decoder_inputs(out: dict[str, Any], given: Mapping[str, Any], model: torch.nn.Module,
                       device: torch.device | str = "cpu") -> dict[str, Any]:
    """`out` (the model's batch, labels dropped) with decoder inputs for an encoder-decoder `model` that has none in
    `given` (the batch as passed, with its labels): the labels shifted right (`labels_feed_decoder`), else the
    encoder's `input_ids` (and its mask), else, for a speech encoder (`input_features` / `input_values`), synthetic
    tokens after the decoder start token (`_decoder_probe`), one row per example, up to the decoder's positions.
    Other models and inputs: `out` unchanged."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in out or "decoder_inputs_embeds" in out:
        return out
    from_labels = _decoder_ids_from_labels(given, model)
    if from_labels is not None:
        out["decoder_input_ids"] = from_labels.to(device)
    elif "input_ids" in out:
        out["decoder_input_ids"] = out["input_ids"]
        if "attention_mask" in out:
            out.setdefault("decoder_attention_mask", out["attention_mask"])
    elif any(key in out for key in ("input_features", "input_values")):  # a speech encoder (Whisper, Speech2Text)
        from hf_koopman.profiling.probes import _decoder_positions, _decoder_probe

        rows = out.get("input_features", out.get("input_values")).shape[0]
        probe = _decoder_probe(config, rows, rows * _decoder_positions(config), torch.Generator().manual_seed(0))
        out["decoder_input_ids"] = probe.to(device)
    return out


def label_mask(batch: Mapping[str, Any], *, decoder_from_labels: bool = False) -> torch.Tensor | None:
    """`labels != -100` `(B, T)`: the decoder positions that carry a loss (as `DataCollatorForSeq2Seq` pads them),
    when `batch` holds integer token `labels` on the decoder's token grid, else `None`.

    The grid is the shape of `decoder_input_ids`. Without them, `decoder_from_labels=True` takes the labels' own
    `(B, T)` shape: in training a sequence-to-sequence model builds its decoder inputs from the labels (`KSSTrainer`,
    and `profile()` where `prepare_batch` does the same, `labels_feed_decoder`). Class labels `(B,)` or `(B, 1)` and
    float targets (a sequence classifier's) are not token labels. BLIP's question answering, given labels without
    decoder inputs, feeds its decoder the labels themselves: they index its embedding, so they hold no -100 and mark no
    padding (its loss counts every position).
    """
    labels, decoder_ids = batch.get("labels"), batch.get("decoder_input_ids")
    if not _token_label_grid(labels):
        return None
    if not isinstance(decoder_ids, torch.Tensor):
        if not decoder_from_labels or labels.shape[1] == 1:  # (B, 1): class labels, not a one-token decoder
            return None
        return labels != -100
    return labels != -100 if labels.shape == decoder_ids.shape else None


def _token_embedding_path(model: torch.nn.Module) -> str | None:
    """Dotted path of the embedding that looks up `input_ids`: `get_input_embeddings()`, else (dual encoders such as
    CLIP do not implement it) the first `nn.Embedding` with one row per id of the text vocabulary. `None` when the
    model has neither (vision and audio models)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if not isinstance(embedding, torch.nn.Module):
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        # a model without a text vocabulary (vision, audio, a plain module) has no token embedding: no walk
        tables = (m for m in model.modules() if isinstance(m, torch.nn.Embedding)) if isinstance(vocab, int) else ()
        embedding = next((m for m in tables if m.num_embeddings == vocab), None)
    return next((name for name, m in model.named_modules() if m is embedding), None) if embedding is not None else None


def _shared_depth(a: str, b: str) -> int:
    """Number of leading dotted-path components `a` and `b` share (`"text_model.encoder"`, `"text_model.emb"`: 1)."""
    return len(list(itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a.split("."), b.split(".")))))


# path components that name an image tower (CLIP's `vision_model`, GIT's `image_encoder`, Qwen-VL's `visual`, ...)
_IMAGE_TOWER_WORDS = ("vision", "visual", "image", "img", "video", "patch", "pixel")
# batch keys that feed a decoder its own tokens (BLIP's question answering, which is not an encoder-decoder config)
_DECODER_INPUTS = ("decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds")


def _stack_paths(blocks: Any) -> dict[str, str]:
    """Stack label -> dotted path of the module list holding its first block (`""` for a block at the root)."""
    paths: dict[str, str] = {}
    for block in blocks:
        paths.setdefault(block.stack, block.name.rsplit(".", 1)[0] if "." in block.name else "")
    return paths


def _names_image_tower(path: str, skip: int) -> bool:
    """Whether a component of `path` after its first `skip` names an image tower (`_IMAGE_TOWER_WORDS`)."""
    return any(word in part.lower() for part in path.split(".")[skip:] for word in _IMAGE_TOWER_WORDS)


def _block_list_under(module: torch.nn.Module, prefix: str, embedding: str, no_split: set[str]) -> bool:
    """Whether `module` (at the dotted path `prefix`) holds a list of transformer blocks (`GradientCheckpointingLayer`s
    or `_no_split_modules` classes) other than a list that holds the token embedding `embedding` itself (MusicGen's
    list of codebook embeddings)."""
    from transformers.modeling_layers import GradientCheckpointingLayer as block_class

    for name, sub in module.named_modules(prefix=prefix):
        if not isinstance(sub, (torch.nn.ModuleList, torch.nn.Sequential)) or not len(sub):
            continue
        if embedding == name or embedding.startswith(f"{name}."):
            continue
        if any(isinstance(child, block_class) or type(child).__name__ in no_split for child in sub):
            return True
    return False


def _embedded_by_another_tower(model: torch.nn.Module, path: str, embedding: str, names: set[str]) -> bool:
    """Whether the token embedding belongs to another tower than the stack whose list is at `path`: the branch that
    holds the embedding, below the path components it shares with `path`, also holds a list of transformer blocks.
    BLIP-2's and Idefics2's connectors (`qformer.encoder.layer`, `model.connector.perceiver_resampler.layers`) read
    query tokens, while `input_ids` feed the language model in that branch (`language_model...`, `model.text_model`);
    a text stack's branch holds only its embeddings (`model.embed_tokens`, CLIP's `text_model.embeddings`). A branch
    that is one of the stack's own blocks (`names`: `layers=["text_model"]`) holds the stack's own embedding."""
    parts = embedding.split(".")
    depth = _shared_depth(path, embedding)
    if depth + 1 >= len(parts):  # the embedding hangs directly on the stack's path: no branch besides it
        return False
    branch = ".".join(parts[: depth + 1])
    if branch in names:
        return False
    no_split = {str(name) for name in getattr(model, "_no_split_modules", None) or ()}
    return _block_list_under(model.get_submodule(branch), branch, embedding, no_split)


def mask_routes(model: torch.nn.Module, blocks: Any, batch: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """Which mask the blocks of each stack are recorded with: `"attention_mask"` (the mask of `input_ids`),
    `"decoder"` (the decoder's mask, see `snapshot_masks`) or `None` (no mask: every position counts).

    Stacks are routed by the path of the module list that holds them, not by their label. A stack under a path
    component naming a decoder (`decoder.block`, BART's `model.decoder.layers`) takes the decoder's mask when the model
    is encoder-decoder (`config.is_encoder_decoder`) or `batch` carries decoder inputs (`decoder_input_ids`,
    `decoder_attention_mask`, `decoder_inputs_embeds`: BLIP's question answering); otherwise such a stack reads
    `input_ids` (BLIP's captioning decoder, OPT's `model.decoder.layers`) and is routed as every other stack.

    Of the other stacks, the mask of `input_ids` belongs only to the tower that embeds them: of several, the stacks
    whose path shares the most leading components with the token embedding's (`text_model.encoder.layers` for CLIP's
    `text_model.embeddings.token_embedding`). The other towers (CLIP's vision tower, which has no padding) get no
    mask, so the text padding does not drop their tokens. A single stack (a `layers=` override of one tower) is tied
    with itself. A tied stack whose path names an image tower after the shared components (a component containing
    "vision", "visual", "image", "img", "video", "patch" or "pixel": GIT's `git.image_encoder...` next to
    `git.encoder.layer`, an embedding at the model's root as in BLIP-2's retrieval model, a `layers=` override of
    CLIP's vision tower) gets no mask. So does a stack whose token embedding sits in a branch that holds another list
    of transformer blocks (`_embedded_by_another_tower`): a `layers=` override of BLIP-2's Q-Former
    (`qformer.encoder.layer`, whose tokens are query tokens) next to the language model that embeds `input_ids`. The
    encoder of an encoder-decoder model is exempt: there `attention_mask` is the mask of the encoder's own inputs
    (Whisper's and Speech2Text's audio frames), whichever tower the token embedding belongs to. The others take
    `attention_mask`. A model without a token embedding gives every stack `attention_mask`. The recorder
    applies a mask only where it matches the block's token grid: GIT's text stack runs on its image tokens followed by
    the text, a grid `(B, P + T)` that the text mask `(B, T)` does not match, so it keeps every position there (the
    text padding included) and warns.

    Args:
        model (`nn.Module`): the model, possibly wrapped (PEFT, DDP, ...): it is unwrapped, as the block names are
            relative to the unwrapped model.
        blocks (`list[ResidualBlock]`): the blocks recorded; their `stack` labels key the result.
        batch (`Mapping`, *optional*): the batch the model gets; only which decoder inputs it holds is read.

    Returns:
        `dict[str, str | None]`: stack label -> mask route.
    """
    model = unwrap_model(model)
    paths = _stack_paths(blocks)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    decoder_fed = encoder_decoder or any((batch or {}).get(key) is not None for key in _DECODER_INPUTS)
    routes: dict[str, str | None] = {"": "attention_mask"}  # the recorder's fallback for a label it is not given
    others = []
    for label, path in paths.items():
        if decoder_fed and any("decoder" in part for part in path.split(".")):
            routes[label] = "decoder"
        else:
            others.append(label)
    # the token embedding's path tells the tower that reads `input_ids`, for one stack as for several: a `layers=`
    # override of a connector alone (BLIP-2's Q-Former) is not that tower
    embedding = _token_embedding_path(model) if others else None
    depths = {label: _shared_depth(paths[label], embedding) for label in others} if embedding is not None else {}
    deepest = max(depths.values(), default=0)
    # one stack (a layers= override of one tower) counts as tied: its path and the embedding's branch tell its tower
    tied = sum(depth == deepest for depth in depths.values()) != 1 or len(others) == 1
    names = {block.name for block in blocks}
    for label in others:
        if embedding is None:
            routes[label] = "attention_mask"
        elif depths[label] != deepest or (tied and _names_image_tower(paths[label], deepest)):
            routes[label] = None
        elif not encoder_decoder and _embedded_by_another_tower(model, paths[label], embedding, names):
            routes[label] = None
        else:
            routes[label] = "attention_mask"
    return routes


#: PEFT methods that prepend `num_virtual_tokens` learned embeddings to the inputs (prefix tuning extends the keys
#: and values instead, leaving the token grid as it is)
_PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def peft_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The PEFT model (`PeftModel`) `model` is or wraps, found inside DDP / DataParallel, FSDP1 and `torch.compile`
    wrappers; `None` for other models."""
    seen: set[int] = set()
    while getattr(model, "active_peft_config", None) is None and id(model) not in seen:
        seen.add(id(model))
        inner = next((getattr(model, name) for name in ("module", "_fsdp_wrapped_module", "_orig_mod")
                      if isinstance(getattr(model, name, None), torch.nn.Module)), None)
        if inner is None:
            return None
        model = inner
    return model if getattr(model, "active_peft_config", None) is not None else None


def virtual_tokens(model: torch.nn.Module, *, positions: bool = False) -> int:
    """Learned tokens a PEFT prompt-learning `model` puts in front of every input sequence (0 for other models): the
    blocks see `num_virtual_tokens + T` positions where the batch's attention mask has `T`. With `positions=True`,
    also prefix tuning's, which are no states of the stream but take the first rows of the position table (its keys
    and values come first, so the text's position ids start after them)."""
    config = getattr(peft_model(model), "active_peft_config", None)
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
    methods = (*_PROMPT_METHODS, "PREFIX_TUNING") if positions else _PROMPT_METHODS
    if not getattr(config, "is_prompt_learning", False) or kind not in methods:
        return 0
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def with_virtual_tokens(masks: dict[Any, torch.Tensor | None], routes: Mapping[Any, str | None],
                        count: int) -> dict[Any, torch.Tensor | None]:
    """`masks` with `count` ones prepended to each `(B, T)` mask of the stack that reads `input_ids` (route
    `"attention_mask"`), as PEFT prompt tuning prepends its virtual tokens (which are real states of the stream)."""
    if not count:
        return masks
    out = dict(masks)
    for label, route in routes.items():
        mask = out.get(label)
        if route == "attention_mask" and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            out[label] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)
    return out


def snapshot_masks(
    routes: Mapping[str, str | None], given: Mapping[str, Any], batch: Mapping[str, Any],
    decoder_from_labels: bool = False,
) -> dict[str, torch.Tensor | None]:
    """The recorder's `attention_mask` dict for one forward: stack label -> `(B, T)` mask or `None`.

    `given` is the batch as the user passed it (with its labels), `batch` what the model gets (`prepare_batch`). The
    decoder's mask is `decoder_attention_mask` (given, or the encoder's mask when `prepare_batch` feeds the decoder
    `input_ids`), else `labels != -100` when the labels are token labels on the grid of the given
    `decoder_input_ids` (`DataCollatorForSeq2Seq` batches) or when the decoder inputs were built from them
    (`decoder_from_labels`: pass `labels_feed_decoder(given, model)`), else none: the decoder's padding is then
    unknown. The label mask reaches the recorder only; the model runs on the batch as given.
    """
    decoder = batch.get("decoder_attention_mask")
    if decoder is None:
        decoder = label_mask(given, decoder_from_labels=decoder_from_labels)
    masks = {"attention_mask": batch.get("attention_mask"), "decoder": decoder, None: None}
    return {label: masks[route] for label, route in routes.items()}
