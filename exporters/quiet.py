"""Keep torch.onnx's progress chatter and unrelated warnings out of the user's terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet_onnx_export():
    """Silence torch.onnx's stdout progress lines, its torchvision notices and warnings.

    Errors still propagate; what was printed is attached to the exception as a note.
    """
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            yield
    except Exception as e:
        if out.getvalue():
            e.add_note(out.getvalue()[-2000:])
        raise
    finally:
        logger.setLevel(level)
