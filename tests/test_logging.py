"""hf_koopman's records follow the transformers verbosity in an application that configures no logging: info records
print under `set_verbosity_info()` (as `TrainingArguments(log_level="info")` sets it), warnings by default, nothing
under `set_verbosity_error()`, and each once where the application has a handler of its own.

The checks run in a child interpreter: pytest puts handlers of its own on the root logger."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import logging, sys
    from transformers.utils import logging as hf_logging
    from hf_koopman.logging_utils import get_logger

    log = get_logger("hf_koopman.profiling.example")
    log.info("info at default verbosity")
    log.warning("warning at default verbosity")
    hf_logging.set_verbosity_info()
    log.info("info at info verbosity")
    log.debug("debug at info verbosity")
    hf_logging.set_verbosity_error()
    log.warning("warning at error verbosity")
    hf_logging.set_verbosity_info()
    import importlib, hf_koopman.logging_utils as utils
    importlib.reload(utils)  # a second handler class: still one line per record
    utils.get_logger("hf_koopman.profiling.example").info("info after a reload")
    logging.basicConfig(stream=sys.stderr, format="root: %(message)s")
    log.info("info with a root handler")
    """
)


def test_records_follow_the_transformers_verbosity_without_logging_configured():
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=True)
    lines = done.stderr.splitlines()
    assert "info at default verbosity" not in done.stderr
    assert lines.count("[hf_koopman] warning at default verbosity") == 1
    assert lines.count("[hf_koopman] info at info verbosity") == 1
    assert "debug at info verbosity" not in done.stderr
    assert "warning at error verbosity" not in done.stderr
    assert lines.count("[hf_koopman] info after a reload") == 1
    assert lines.count("root: info with a root handler") == 1
    assert "[hf_koopman] info with a root handler" not in lines
