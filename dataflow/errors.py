"""The one exception tree of the project.

Every error the pipeline raises on purpose derives from `PipelineError`, and its message
says what to do about it. Bad *input* is not an exception: it is data, sent to the
dead-letter topic (see `dataflow.core.events`).
"""


class PipelineError(Exception):
    """Base of every error raised on purpose by this project."""


class ConfigError(PipelineError):
    """A setting is missing or malformed; the message names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


class PreflightError(PipelineError):
    """Something the pipeline needs is missing or unreachable at start (`dataflow.preflight`).

    `variable` is the setting that points at it, `value` that setting's value as it may be
    shown (secrets masked); the message is one line: `VARIABLE=value: what is wrong`.
    """

    def __init__(self, variable: str, value: str, problem: str) -> None:
        self.variable = variable
        self.value = value
        self.problem = problem
        super().__init__(f"{variable}={value}: {problem}")


class SinkError(PipelineError):
    """A sink could not write after its retries ran out.

    Raised so the dataflow stops before its epoch commits: on restart, recovery rewinds
    Kafka to the last snapshot and the writes are replayed. Nothing is dropped.
    """


class RecoveryFormatError(PipelineError):
    """A recovery snapshot was written by another layout of a stateful step."""

    def __init__(self, step: str, found: object, expected: int) -> None:
        self.step, self.found, self.expected = step, found, expected
        super().__init__(
            f"recovery state of step {step!r} has layout version {found}; this build reads "
            f"version {expected}. Rebuild the features into a new prefix with "
            "`python -m dataflow.tools.replay --prefix <new prefix>` and its own recovery "
            "directory (docs/operations.md, 'Replay'), then switch the readers to it; or "
            "start this pipeline with an empty RECOVERY_DIR."
        )


class SegmentError(PipelineError):
    """The segment store (`dataflow.core.segments`) could not keep or give back a segment
    of a feature shard's recovery state."""


class SegmentMissingError(SegmentError):
    """A segment a recovery snapshot refers to is gone from the segment store."""

    def __init__(self, segment: str, where: str) -> None:
        self.segment = segment
        super().__init__(
            f"segment {segment!r} of the feature state, which the recovery snapshot refers "
            f"to, is not in {where}: the recovery directory belongs to another state topic, "
            "or the topic was deleted or altered. Rebuild the features into a new prefix "
            "with `python -m dataflow.tools.replay --prefix <new prefix>` and its own "
            "recovery directory (docs/operations.md, 'Replay'), then switch the readers to it."
        )


class RequestError(PipelineError):
    """One request to a store failed; `reason` is a short, low-cardinality label for metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableError(RequestError):
    """The request may succeed later (unreachable, timeout, 429, 5xx...)."""


class RejectedError(RequestError):
    """The store refused the whole request for good (a 4xx that retrying cannot fix)."""


class IndexMappingError(PipelineError):
    """An existing OpenSearch index has a mapping that conflicts with the one we need."""


class ReaderError(PipelineError):
    """A feature read got no usable answer from Redis (`dataflow.reader`); the message says
    what failed. The ranking service serves the request without these features."""


class ReaderTimeout(ReaderError):
    """A feature read did not complete within its deadline (a slow or unreachable Redis)."""
