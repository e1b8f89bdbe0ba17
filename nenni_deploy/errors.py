"""User-facing errors: the command line prints them as one line and exits non-zero."""


class NenniError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


class UnsupportedLayerError(NenniError):
    """A layer that NENNI cannot convert (e.g. a grouped convolution chosen by name)."""
