"""Errors a user can cause: each message says what went wrong and what to do about it."""


class AnalyzerError(Exception):
    """Base class of user errors; the CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class ModelFileError(AnalyzerError):
    """The model path is missing, unreadable or not an ONNX file."""


class NotALanguageModelError(AnalyzerError):
    """The ONNX graph is not a decoder-only language model maxact can analyse."""


class CorpusError(AnalyzerError):
    """The corpus is missing, empty or in a format maxact cannot read."""


class TokenizerError(AnalyzerError):
    """No usable tokenizer was found for the model."""


class ExportError(AnalyzerError):
    """A checkpoint could not be exported to ONNX."""


class RunInterrupted(AnalyzerError):
    """A run stopped on SIGINT or SIGTERM after saving its checkpoint; ``exit_code`` is 128 + the
    signal number, as a shell reports a process that a signal ended."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunFileError(AnalyzerError):
    """A run file is missing, unreadable or not an HDF5 file written by ``analyzer run``."""


class OutputError(AnalyzerError):
    """An output path that would replace an input or a file of another kind, that cannot be
    written, or whose write failed (a full disk)."""


class ResumableError(OutputError):
    """A write of ``analyzer run`` failed (the run file or a checkpoint: a full disk) after its
    measured batches were kept in the checkpoint; the CLI adds the ``--resume`` command that
    finishes the run (only the final write, when every batch was measured)."""
