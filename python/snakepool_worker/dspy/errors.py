"""The error types of the DSPy commands; their class names are the ``error.type`` strings.

``InvalidArgument`` is the runtime's (``snakepool_worker.arguments``), shared by every
command module; the others derive from ``DSPyBridgeError``.
"""

from __future__ import annotations

from ..arguments import InvalidArgument

__all__ = [
    "ApiKeyMissing",
    "DSPyBridgeError",
    "DummyAnswersExhausted",
    "InvalidArgument",
    "InvalidSignature",
    "InvalidState",
    "LMCallFailed",
    "LMNotConfigured",
    "LMProfileInvalid",
    "LMProfileNotFound",
    "LMSettingsForbidden",
    "MissingInput",
    "ProgramNotFound",
    "ReservedFieldName",
    "ServedProgramInvalid",
    "SessionRequired",
    "UnknownInput",
    "UnknownMetric",
    "UnsupportedType",
]


class DSPyBridgeError(Exception):
    """Base class of the errors raised by the DSPy commands (besides ``InvalidArgument``)."""


class SessionRequired(DSPyBridgeError):
    """A DSPy command was called without ``args.session_id``."""


class InvalidSignature(DSPyBridgeError):
    """A signature cannot be parsed or names its fields in a way DSPy cannot use."""


class ReservedFieldName(InvalidSignature):
    """A field is named like one of DSPy's call options (see ``RESERVED_FIELD_NAMES``)."""


class UnsupportedType(InvalidSignature):
    """A signature field has a type outside ``ALLOWED_TYPES``."""


class ProgramNotFound(DSPyBridgeError):
    """No program with the given id exists in the session (or no served program has the
    given name)."""


class ServedProgramInvalid(DSPyBridgeError):
    """A served program (``SNAKEPOOL_PROGRAMS``) cannot be run: its entry or its file is
    not usable. The message names the program and its file."""


class MissingInput(DSPyBridgeError):
    """``execute_program`` was not given every input field of the signature."""


class UnknownInput(DSPyBridgeError):
    """``execute_program`` was given inputs the signature does not declare."""


class LMNotConfigured(DSPyBridgeError):
    """The command needs a language model and the session has none."""


class ApiKeyMissing(DSPyBridgeError):
    """The environment variable named by ``api_key_env`` is not set in the worker."""


class LMSettingsForbidden(DSPyBridgeError):
    """The LM settings asked for are not allowed by the pool's LM policy."""


class LMProfileNotFound(DSPyBridgeError):
    """``configure_lm`` named a profile that ``SNAKEPOOL_LM_PROFILES`` does not define."""


class LMProfileInvalid(DSPyBridgeError):
    """``SNAKEPOOL_LM_PROFILES`` (or a profile's cache) cannot be used as configured."""


class LMCallFailed(DSPyBridgeError):
    """A call to the language model failed at the provider or on the way to it.

    The message is short and names the profile, the model and the kind of failure; the
    provider's own message and reply body go to the worker's log only.
    """


class UnknownMetric(DSPyBridgeError):
    """``optimize_program`` was given a metric name it does not know."""


class InvalidState(DSPyBridgeError):
    """A program state (from ``dump_program_state``) does not fit the program."""


class DummyAnswersExhausted(DSPyBridgeError):
    """A dummy LM was called after its list of scripted answers was used up."""
