"""Turn whatever the user passes to `profile(model, inputs)` into an iterator of model-ready batch dicts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from hf_koopman.logging_utils import get_logger


__all__ = ["iter_batches", "prepare_batch", "byte_tokenize"]

logger = get_logger(__name__)

# keys that only feed the loss; the residual stream does not depend on them
_LABEL_KEYS = ("labels", "label", "label_ids", "start_positions", "end_positions")
_TEXT_COLUMNS = ("text", "content", "sentence", "document")


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


def _tokenize(texts: list[str], tokenizer: Any, model: Any, max_length: int, first: bool = True) -> dict[str, torch.Tensor]:
    """Tokenise one batch of texts; `first` is True for the first batch of a `profile()` call (warns once)."""
    if tokenizer is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int):
            raise ValueError(
                "text inputs need a tokenizer: pass profile(model, texts, tokenizer=AutoTokenizer.from_pretrained(...))."
            )
        if first:
            logger.warning("no tokenizer given: using byte-level ids (only sensible for randomly initialised models)")
        return byte_tokenize(texts, vocab, max_length)
    if getattr(tokenizer, "pad_token", "x") is None:  # GPT-2 style tokenizers ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(encoded)


def _pad_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate dataset rows with variable-length `input_ids` into right-padded tensors + attention mask."""
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
            tensor[i, : len(v)] = torch.as_tensor(v, dtype=torch.long)
        out[key] = tensor
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return out


def _iter_dataset(dataset: Any, tokenizer: Any, model: Any, batch_size: int, max_length: int) -> Iterator[dict]:
    columns = list(dataset.column_names)
    if "input_ids" in columns or "pixel_values" in columns:
        keep = [c for c in columns if c not in _LABEL_KEYS]
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        for start in range(0, len(dataset), batch_size):
            chunk = dataset[start : start + batch_size]
            if "pixel_values" in keep:
                yield {"pixel_values": torch.as_tensor(chunk["pixel_values"], dtype=torch.float32)}
            else:
                rows = [{k: chunk[k][i] for k in keep} for i in range(len(chunk["input_ids"]))]
                yield _pad_rows(rows, pad_id)
        return
    text_column = next((c for c in _TEXT_COLUMNS if c in columns), None)
    if text_column is None:
        raise ValueError(
            f"cannot profile on a Dataset with columns {columns}: it needs `input_ids` (tokenised), `pixel_values`, "
            f"or a text column named one of {_TEXT_COLUMNS}."
        )
    texts: list[str] = []
    first = True
    for text in dataset[text_column]:
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
    of batch dicts (e.g. a `DataLoader`)."""
    if isinstance(inputs, Mapping):
        yield dict(inputs)
        return
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point():
            yield {getattr(model, "main_input_name", "pixel_values"): inputs}
        else:
            yield {"input_ids": inputs}
        return
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        for start in range(0, len(inputs), batch_size):
            yield _tokenize(list(inputs[start : start + batch_size]), tokenizer, model, max_length, start == 0)
        return
    if hasattr(inputs, "column_names") and hasattr(inputs, "__getitem__"):  # datasets.Dataset without importing it
        yield from _iter_dataset(inputs, tokenizer, model, batch_size, max_length)
        return
    if isinstance(inputs, Iterable):
        for batch in inputs:
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"profile() iterates over batches and expects dicts of tensors, got {type(batch).__name__}; use a "
                    "DataLoader with a collator that returns dicts (e.g. DataCollatorWithPadding)."
                )
            yield dict(batch)
        return
    raise TypeError(
        f"unsupported inputs of type {type(inputs).__name__}: pass a batch dict, a tensor, text or a list of texts "
        "(with tokenizer=), a datasets.Dataset, a DataLoader, or None for the default synthetic probe."
    )


def _accepts(model: torch.nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def prepare_batch(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Drop label keys, move tensors to the model's device (floats to its dtype) and add decoder inputs for
    encoder-decoder models (the decoder is probed with the encoder's tokens)."""
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    out = {}
    for key, value in batch.items():
        if key in _LABEL_KEYS:
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        out[key] = value
    if "use_cache" not in out and _accepts(model, "use_cache"):
        out["use_cache"] = False  # a diagnostic forward needs no KV cache (and some hybrid caches need a prefill)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and "input_ids" in out and "decoder_input_ids" not in out:
        out["decoder_input_ids"] = out["input_ids"]
        if "attention_mask" in out:
            out.setdefault("decoder_attention_mask", out["attention_mask"])
    return out
