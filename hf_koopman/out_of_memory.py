"""`is_out_of_memory`: whether an exception is an allocation failure, whatever raised it."""

from __future__ import annotations


#: how allocators word a failure in a RuntimeError (torch's CPU allocator, CUDA, safetensors' reads)
_PHRASES = ("can't allocate", "cannot allocate", "out of memory", "not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure: `MemoryError`, `torch.OutOfMemoryError`, or a `RuntimeError` of an
    allocator (`DefaultCPUAllocator: can't allocate memory`), which says nothing about the data being read."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return any(phrase in str(err).lower() for phrase in _PHRASES)
