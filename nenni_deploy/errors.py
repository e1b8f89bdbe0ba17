"""User-facing errors: the command line prints them as one line and exits non-zero."""


class NenniError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class UnsupportedLayerError(NenniError):
    """A layer that NENNI cannot convert (e.g. a grouped convolution chosen by name)."""


def dataclass_from_dict(cls, d: dict, what: str):
    """Build a settings dataclass from JSON, refusing keys it does not know (a typo must not pass silently)."""
    import dataclasses

    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise NenniError(f"unknown {what} config keys: {', '.join(sorted(unknown))}")
    return cls(**d)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries wrap the cause in paragraphs of advice), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
