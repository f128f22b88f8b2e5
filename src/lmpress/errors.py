"""The one error type users see. The CLI prints its message on one line and exits non-zero."""


class LmpressError(Exception):
    """An error a person can act on: the message says what went wrong and what to do."""

    exit_code = 1


class ModelNotFound(LmpressError):
    exit_code = 2


class CorruptModel(LmpressError):
    exit_code = 3


class UnsupportedModel(LmpressError):
    exit_code = 4


class BadInput(LmpressError):
    exit_code = 2
