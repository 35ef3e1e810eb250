"""The offline data folder: one resolver for every reader (graphs, WikiText-2, MNIST, ...).

The folder is always passed in or read from `$HF_KOOPMAN_DATA`; nothing is hard-coded and nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DataDirNotFoundError", "resolve_data_dir"]


class DataDirNotFoundError(FileNotFoundError, ValueError):
    """No usable data folder. A `FileNotFoundError` (it is a missing folder) and, for the callers that have always
    caught bad arguments as such, a `ValueError`."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else `$HF_KOOPMAN_DATA`, as an existing folder.

    Raises:
        `DataDirNotFoundError`: neither is given, or the folder does not exist; the message names both ways to fix it.
    """
    chosen = data_dir if data_dir is not None else os.environ.get("HF_KOOPMAN_DATA")
    if chosen is None:
        raise DataDirNotFoundError(
            "no data directory: pass --data-dir (data_dir=... in Python) or set HF_KOOPMAN_DATA to the offline data "
            "folder (the one that holds graphs/, wikitext-2/, mnist/)"
        )
    path = Path(chosen)
    if not path.is_dir():
        raise DataDirNotFoundError(
            f"data directory {path} does not exist (pass --data-dir, data_dir=... in Python, or set HF_KOOPMAN_DATA)"
        )
    return path
