"""Errors a user can cause: each message says what went wrong and what to do about it."""


class AnalyzerError(Exception):
    """Base class of user errors; the CLI prints the message on one line and exits with code 2."""

    exit_code = 2


#: The numeric flags several commands share: the least value each takes, and what that value means.
_LEAST = {"batch_size": (1, ""), "max_length": (1, ""), "seed": (0, ""), "threads": (0, " (0: onnxruntime's default)")}


def check_counts(**values: int | None) -> None:
    """Check the shared numeric flags (``batch_size``, ``max_length``, ``seed``, ``threads``; None:
    not given) against their least values, in the order given.

    Raises:
        AnalyzerError: the first that is below, e.g. "--batch-size must be at least 1, not 0".
    """
    for name, value in values.items():
        least, meaning = _LEAST[name]
        if value is not None and value < least:
            bound = "at least 1" if least == 1 else f"{least} or more{meaning}"
            raise AnalyzerError(f"--{name.replace('_', '-')} must be {bound}, not {value}")


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
