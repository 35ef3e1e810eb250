"""Library loggers that follow `transformers.logging.set_verbosity_*` (and `TRANSFORMERS_VERBOSITY`).

`get_logger(__name__)` returns the usual stdlib logger of the module (records still propagate to the root logger, so
applications and pytest's `caplog` see them) with a filter that drops records below the verbosity transformers is
set to: `transformers.logging.set_verbosity_error()` silences hf_koopman's warnings as it silences transformers', and
`set_verbosity_info()` (or `TrainingArguments(log_level="info")`) shows its info records. The verbosity decides, not
the logger level: the `hf_koopman` package logger passes every record to the filter unless its level is set. Where no
handler would print a record (an application that configures no logging), one writes it to stderr as
`[hf_koopman] message`, as transformers' own handler writes `[transformers] message`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator


__all__ = ["errors_only", "get_logger", "show_progress"]


_FLOOR: contextvars.ContextVar[int] = contextvars.ContextVar("hf_koopman_log_floor", default=logging.NOTSET)


class _TransformersVerbosity(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < _FLOOR.get():
            return False
        try:  # the math core (hf_koopman.koopman) works without transformers; then nothing else is filtered
            from transformers.utils import logging as hf_logging
        except ImportError:
            return True
        return record.levelno >= hf_logging.get_verbosity()


@contextlib.contextmanager
def errors_only(active: bool = True) -> Iterator[None]:
    """Within the block (when `active`), hf_koopman logs errors only: a process that repeats the main process's work
    (a replica in a distributed run) leaves its warnings to the main process."""
    token = _FLOOR.set(logging.ERROR) if active else None
    try:
        yield
    finally:
        if token is not None:
            _FLOOR.reset(token)


_FILTER = _TransformersVerbosity()
_PACKAGE = "hf_koopman"
_MARK = "_hf_koopman_stderr_where_unhandled"


class _StderrWhereUnhandled(logging.Handler):
    """Writes a record to stderr (the stream of the moment) when no other handler on the record's way to the
    root logger would: Python's last-resort handler prints warnings only, so info records shown by
    `set_verbosity_info()` need a handler in an application that configures none."""

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(not getattr(handler, _MARK, False) for handler in logger.handlers):
                return
            if not logger.propagate:
                break
            logger = logger.parent
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must not raise into the library's caller
            self.handleError(record)


def _configure_package_logger() -> None:
    package = logging.getLogger(_PACKAGE)
    if not any(getattr(handler, _MARK, False) for handler in package.handlers):  # one, also after a module reload
        handler = _StderrWhereUnhandled()
        setattr(handler, _MARK, True)
        handler.setFormatter(logging.Formatter(f"[{_PACKAGE}] %(message)s"))
        package.addHandler(handler)
        if package.level == logging.NOTSET:  # a level the application set is kept
            package.setLevel(logging.DEBUG)


def get_logger(name: str) -> logging.Logger:
    """The logger `name`, filtered by the transformers verbosity."""
    if name == _PACKAGE or name.startswith(_PACKAGE + "."):
        _configure_package_logger()
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a progress bar: `progress` when given, else transformers' progress-bar switch
    (`transformers.utils.logging.disable_progress_bar()` hides hf_koopman's bars as it hides transformers')."""
    if progress is not None:
        return bool(progress)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the math core works without transformers
        return True
    return hf_logging.is_progress_bar_enabled()
