"""What a failed LM call tells the client: the kind of failure, never the provider's words.

A provider's error message and reply body can hold anything the endpoint returns (with a
client-chosen endpoint, an internal page), and its URL names the endpoint. So a failure
at the provider or on the way to it (an HTTP error, an unreachable endpoint, a reply that
is not JSON) is reported as ``LMCallFailed`` with a message built here from the status
code and the error's class, e.g. ``LM call failed (profile 'x', model 'openai/m'): HTTP
404 from the provider (InvalidRequestError)``. The caller logs the original for the
operator and raises the new error without chaining it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

from .errors import DSPyBridgeError, DummyAnswersExhausted

UPSTREAM_MODULES = (
    "litellm",
    "httpx",
    "httpcore",
    "openai",
    "anthropic",
    "requests",
    "urllib3",
    "aiohttp",
    "dspy._vendor.lm15",
    "dspy.lm15",
    "dspy.clients",
)
"""Modules whose exceptions come from the provider or the way to it (with DSPy's LMError)."""


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its cause or context, and so on (each once)."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ if current.__cause__ is not None else current.__context__


def exhausted_script(exc: BaseException) -> Optional[DummyAnswersExhausted]:
    """The used-up dummy script behind ``exc`` when DSPy wrapped it, else ``None``."""
    for item in chain(exc):
        if isinstance(item, DummyAnswersExhausted):
            return None if item is exc else item
    return None


def _is_upstream(exc: BaseException, lm_error: Any) -> bool:
    if lm_error is not None and isinstance(exc, lm_error):
        return True
    module = type(exc).__module__ or ""
    return any(module == name or module.startswith(name + ".") for name in UPSTREAM_MODULES)


def _status(exc: BaseException) -> Optional[int]:
    for name in ("status", "status_code"):
        value = getattr(exc, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def summary(upstream: List[BaseException]) -> str:
    """What went wrong, without the provider's message, body or address."""
    kind = type(upstream[-1]).__name__
    status = next((code for code in map(_status, upstream) if code is not None), None)
    classes = {cls.__name__ for exc in upstream for cls in type(exc).__mro__}
    if status is not None and status >= 400:
        what = f"HTTP {status} from the provider"
    elif classes & {"LMTimeoutError", "Timeout", "TimeoutException", "APITimeoutError"}:
        what = "the provider did not answer in time"
    elif classes & {"LMTransportError", "ConnectError", "APIConnectionError", "TransportError"}:
        what = "the provider could not be reached"
    elif status is not None:
        what = f"the provider's reply (HTTP {status}) could not be used"
    elif classes & {"LMConfigurationError", "LMUnsupportedFeatureError"}:
        what = "DSPy refused the call's settings"
    else:
        what = "the provider's reply could not be used"
    return f"{what} ({kind})"


def lm_label(lm_info: Optional[Dict[str, Any]]) -> str:
    """``profile 'x', model 'openai/m'`` (or just the model) for the session's LM."""
    info = lm_info or {}
    model = info.get("model")
    profile = info.get("profile")
    parts = [f"profile {profile!r}"] if profile else []
    if model:
        parts.append(f"model {model!r}")
    return ", ".join(parts) or "unknown model"


def lm_call_failure(
    exc: BaseException, lm_info: Optional[Dict[str, Any]], dspy: Any
) -> Optional[str]:
    """The ``LMCallFailed`` message for ``exc``, or ``None`` when it is not such a failure.

    Errors of these commands and ``AdapterParseError`` (the LM answered, but not in the
    signature's shape) are not: they pass through unchanged.
    """
    adapter_error = getattr(dspy, "AdapterParseError", None)
    if isinstance(exc, DSPyBridgeError) or (
        adapter_error is not None and isinstance(exc, adapter_error)
    ):
        return None
    lm_error = getattr(dspy, "LMError", None)
    upstream = [item for item in chain(exc) if _is_upstream(item, lm_error)]
    if not upstream:
        return None
    return f"LM call failed ({lm_label(lm_info)}): {summary(upstream)}"
