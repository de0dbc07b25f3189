"""The one error type of secure aggregation: a one-line reason, "<problem>: <details>"."""


class SecAggError(ValueError):
    """A secure-aggregation message or state that breaks the protocol (docs/SECAGG.md)."""
