"""Library loggers that follow `transformers.logging.set_verbosity_*` (and `TRANSFORMERS_VERBOSITY`).

`get_logger(__name__)` returns the usual stdlib logger of the module (records still propagate to the root logger, so
applications and pytest's `caplog` see them) with a filter that drops records below the verbosity transformers is
set to: `transformers.logging.set_verbosity_error()` silences hf_koopman's warnings as it silences transformers'.
"""

from __future__ import annotations

import logging


__all__ = ["get_logger", "show_progress"]


class _TransformersVerbosity(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:  # the math core (hf_koopman.koopman) works without transformers; then nothing is filtered
            from transformers.utils import logging as hf_logging
        except ImportError:
            return True
        return record.levelno >= hf_logging.get_verbosity()


_FILTER = _TransformersVerbosity()


def get_logger(name: str) -> logging.Logger:
    """The logger `name`, filtered by the transformers verbosity."""
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
