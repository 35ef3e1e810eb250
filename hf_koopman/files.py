"""Files on disk: writing them whole, and telling a readable safetensors file from a cut-short one.

A profile's files, the callback's files, the guard's run record and a fitted risk estimator are written beside their
final place first and moved there once complete (`os.replace` is atomic within a folder), so that a failure (a full
disk, a kill, an exception while rendering) never leaves a half-written file or a new report next to an old profile.
A Hub export replaces a whole folder of files written by `save_pretrained`; it keeps the earlier export aside instead
(`hf_koopman.models.publishing`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

#: a staging folder older than this (seconds) belongs to a write that was killed before it could clean up
STALE_STAGING_S = 3600.0


def write_text_whole(path: str | os.PathLike, text: str, *, partial_prefix: str = ".") -> None:
    """Write `text` to `path` whole or not at all: into `<partial_prefix><name>.<random>.partial` beside it first (a
    name of its own, so that two processes writing the same file do not share it), then moved into place with the
    earlier file's permissions. A failure removes the partial file and leaves an earlier `path` as it was. A symbolic
    link is written through, as `open` does: the file it points to is replaced. (`partial_prefix="_"` keeps the partial
    file out of the Trainer's Hub pushes, which skip names starting with `_`.)"""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    partial = path.with_name(f"{partial_prefix}{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        if path.is_file():
            shutil.copymode(path, partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def remove_stale_staging(directory: Path, prefix: str) -> None:
    """Remove the staging folders (`prefix*`) of writes into `directory` that were killed (SIGKILL, power loss) more
    than `STALE_STAGING_S` ago; a running write's folder is younger and stays."""
    now = time.time()
    for folder in directory.glob(f"{prefix}*"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # removed meanwhile by another write
            continue


@contextlib.contextmanager
def staging_folder(directory: Path, prefix: str) -> Iterator[Path]:
    """A new folder `directory/<prefix><random>` to write files into before `move_into_place`; removed on exit, with
    whatever it still holds (the replaced files). Stale ones of killed writes are removed first."""
    remove_stale_staging(directory, prefix)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, directory: Path, new: Sequence[str], stale: Sequence[str] = ()) -> None:
    """Move the files `new` from `staging` into `directory`, and the files `stale` (an earlier write's that this one
    does not replace) out of it, all or nothing: the files already in `directory` under those names go to
    `staging/earlier` first, and come back if a move fails."""
    backup = staging / "earlier"
    backup.mkdir()
    aside: list[str] = []
    placed: list[str] = []
    try:
        for name in [*new, *stale]:
            try:
                os.replace(directory / name, backup / name)
            except FileNotFoundError:  # absent, or moved away by another write into this folder meanwhile
                continue
            aside.append(name)
        for name in new:
            os.replace(staging / name, directory / name)
            placed.append(name)
    except BaseException:
        for name in placed:
            (directory / name).unlink(missing_ok=True)
        for name in aside:
            os.replace(backup / name, directory / name)
        raise


def safetensors_error(file: str | os.PathLike) -> Exception | None:
    """Why `file` is not a readable safetensors file (a header that does not parse, or does not cover the file: cut
    short by an interrupted copy, overwritten), or `None` when it is. Reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:  # checks the header and that it covers the file
            handle.keys()
    except (SafetensorError, OSError) as err:
        return err
    return None


def unreadable_safetensors(file: str | os.PathLike, err: BaseException) -> str:
    """The error message for a safetensors file that cannot be read (`safetensors_error`)."""
    return (f"{file} is not a readable safetensors file ({type(err).__name__}: {err}). It is truncated or corrupt: "
            "re-save the model with model.save_pretrained(folder) or copy the file again.")
