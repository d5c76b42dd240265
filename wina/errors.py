"""The library's own exception types: every user-facing failure is a WinaError with one clear line."""


class WinaError(Exception):
    """Base class: the message is meant to be shown to a user as one line."""


class UnsupportedArchitecture(WinaError):
    pass


class ModelLoadError(WinaError):
    pass


class InvalidArgument(WinaError):
    pass


class TransformError(WinaError):
    pass


class PlanError(WinaError):
    pass


class DataError(WinaError):
    pass


class Cancelled(WinaError):
    """Raised inside a long step when its cancel token was triggered."""
