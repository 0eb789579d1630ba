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
    # _registration: "torchvision is not installed"; _core: "nn_module_stack not found" for every
    # node of a make_fx graph (only torch.export records module paths).
    loggers = [logging.getLogger(f"torch.onnx._internal.exporter.{name}") for name in ("_registration", "_core")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
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
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
