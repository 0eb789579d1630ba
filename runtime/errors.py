"""Exceptions raised by edgecl; each message names the bad value and what is accepted."""


class EdgeclError(Exception):
    """Base class of every error edgecl raises on purpose."""


class ArtifactError(EdgeclError):
    """An artifact folder is missing a file, has an altered file, or an unreadable manifest."""


class BatchError(EdgeclError, ValueError):
    """A training or evaluation batch has the wrong shape, dtype, range or non-finite values."""


class UnsupportedModelError(EdgeclError, ValueError):
    """The exporter met a layer or op it cannot put into a training graph."""


class FolderBusyError(EdgeclError):
    """Another process or thread is writing the folder (it holds the folder's lock file): one writer per folder."""


class CheckpointFormatError(ArtifactError):
    """A checkpoint was written by another version of edgecl, in a format this one does not resume."""


class ConfigMismatchError(EdgeclError, ValueError):
    """A checkpoint was written by a run with other settings than the one asked to resume it.

    Attributes:
        differences: one "field: <checkpoint's value> in the checkpoint, <value> now" per field.
    """

    def __init__(self, message: str, differences: list[str]):
        super().__init__(message)
        self.differences = differences
