"""Keeping the libraries we drive quiet unless --debug: their progress logs and advice are not our output."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_onnxruntime_tools(debug: bool) -> Iterator[None]:
    """ONNX Runtime's optimizer and quantizers log under bare module names and the root logger, print, and warn."""
    if debug:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
