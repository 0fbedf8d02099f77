"""The LM policy: the operator's named profiles and what clients may set themselves.

Read from the worker's environment (the host sets it), never from a request:

- ``SNAKEPOOL_LM_PROFILES``: ``{"NAME": {"model", "api_base"?, "api_key_env"?,
  "temperature"?, "max_tokens"?, "num_retries"?, "cache"?}}``, parsed and checked on
  first use (again only if the value changes). A malformed value raises
  ``LMProfileInvalid`` on every use, naming the profile and key; nothing fails at import.
- ``SNAKEPOOL_LM_CLIENT_SETTINGS``: ``allow`` lets clients give model, endpoint and key
  variable themselves; unset or anything else denies it.
- ``SNAKEPOOL_LM_CACHE_DIR``: read by ``caches``.

Whatever the policy, variables starting with ``SNAKEPOOL_`` are never used as API keys.
Standard library only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Dict, Optional, Tuple

from ..arguments import describe, names, quoted
from .errors import ApiKeyMissing, LMProfileInvalid, LMSettingsForbidden

PROFILES_ENV = "SNAKEPOOL_LM_PROFILES"
CLIENT_SETTINGS_ENV = "SNAKEPOOL_LM_CLIENT_SETTINGS"
CACHE_DIR_ENV = "SNAKEPOOL_LM_CACHE_DIR"
POOL_ENV_PREFIX = "SNAKEPOOL_"
"""Variables with this prefix belong to the pool and are never used as API keys."""

DEFAULT_NUM_RETRIES = 2
"""Retries of transient provider errors per LM call (DSPy's own default is 3)."""

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
"""What an environment variable name looks like."""

NAME_RULE = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9_.-]{1,128}\Z")
"""What the name of a profile (or of a served program) looks like."""
PROFILE_KEYS: Tuple[str, ...] = (
    "model",
    "api_base",
    "api_key_env",
    "temperature",
    "max_tokens",
    "num_retries",
    "cache",
)
"""The settings an LM profile holds."""

_log = logging.getLogger(__package__)


class LMProfile:
    """A named LM configuration defined by the operator in ``SNAKEPOOL_LM_PROFILES``."""

    __slots__ = ("name",) + PROFILE_KEYS

    def __init__(
        self,
        name: str,
        model: str,
        api_base: Optional[str] = None,
        api_key_env: Optional[str] = None,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        num_retries: int = DEFAULT_NUM_RETRIES,
        cache: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        self.api_base = api_base
        self.api_key_env = api_key_env
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.num_retries = num_retries
        self.cache = cache

    def identity(self) -> Tuple[Any, ...]:
        """Everything that decides where the profile's calls go and what they send."""
        return tuple(getattr(self, name) for name in self.__slots__)


def _profile_error(name: str, key: str, expected: str, value: Any) -> LMProfileInvalid:
    return LMProfileInvalid(
        f"{PROFILES_ENV}: profile {name!r}: {key!r} must be {expected}, got {describe(value)}"
    )


def _parse_profile(name: Any, entry: Any) -> LMProfile:
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise LMProfileInvalid(
            f"{PROFILES_ENV}: profile name {name!r} is not usable; names are 1-128 letters, "
            "digits, '_', '.' or '-', other than '.' and '..' (each names a directory)"
        )
    if not isinstance(entry, dict):
        raise LMProfileInvalid(
            f"{PROFILES_ENV}: profile {name!r} must be an object {{model, api_base?, "
            f"api_key_env?, ...}}, got {describe(entry)}"
        )
    unknown = [key for key in entry if key not in PROFILE_KEYS]
    if unknown:
        raise LMProfileInvalid(
            f"{PROFILES_ENV}: profile {name!r} has unknown key(s) {quoted(unknown)}; "
            f"allowed: {names(PROFILE_KEYS)}"
        )
    values: Dict[str, Any] = {}
    for key in ("model", "api_base", "api_key_env"):
        value = entry.get(key)
        if value is None:
            if key == "model":
                raise LMProfileInvalid(f"{PROFILES_ENV}: profile {name!r}: 'model' is required")
            continue
        if not isinstance(value, str) or not value:
            raise _profile_error(name, key, "a non-empty string", value)
        if key == "api_key_env" and not ENV_NAME.match(value):
            raise _profile_error(name, key, "an environment variable name", value)
        if key == "api_base" and not value.startswith(("http://", "https://")):
            raise _profile_error(name, key, "an http:// or https:// URL", value)
        values[key] = value
    temperature = entry.get("temperature")
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise _profile_error(name, "temperature", "a number >= 0", temperature)
        values["temperature"] = float(temperature)
    for key, minimum in (("max_tokens", 1), ("num_retries", 0)):
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _profile_error(name, key, f"an integer >= {minimum}", value)
        values[key] = value
    cache = entry.get("cache")
    if cache is not None:
        if not isinstance(cache, bool):
            raise _profile_error(name, "cache", "true or false", cache)
        values["cache"] = cache
    return LMProfile(name, **values)


def parse_profiles(text: str) -> Dict[str, LMProfile]:
    """Parse and check a ``SNAKEPOOL_LM_PROFILES`` value; raise ``LMProfileInvalid``."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LMProfileInvalid(f"{PROFILES_ENV} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LMProfileInvalid(
            f"{PROFILES_ENV} must be a JSON object {{NAME: {{model, ...}}}}, got "
            f"{describe(data)}"
        )
    return {name: _parse_profile(name, entry) for name, entry in data.items()}


_profiles_memo: Optional[Tuple[str, Any]] = None


def lm_profiles() -> Dict[str, LMProfile]:
    """The operator's profiles, parsed on first use (again only if the variable changes).

    A malformed ``SNAKEPOOL_LM_PROFILES`` raises ``LMProfileInvalid`` on every use, so
    the commands that need a profile fail clearly while the worker keeps serving.
    """
    global _profiles_memo
    text = os.environ.get(PROFILES_ENV, "")
    memo = _profiles_memo
    if memo is None or memo[0] != text:
        try:
            memo = (text, parse_profiles(text))
        except LMProfileInvalid as exc:
            memo = (text, exc)
        _profiles_memo = memo
    parsed = memo[1]
    if isinstance(parsed, LMProfileInvalid):
        raise LMProfileInvalid(str(parsed))
    profiles: Dict[str, LMProfile] = parsed
    return profiles


def client_settings_allowed() -> bool:
    """Whether ``SNAKEPOOL_LM_CLIENT_SETTINGS=allow`` lets clients choose model and endpoint."""
    return os.environ.get(CLIENT_SETTINGS_ENV, "").strip().lower() == "allow"


def profile_names() -> str:
    """The profile names for a message, or why there are none."""
    try:
        found = sorted(lm_profiles())
    except LMProfileInvalid:
        return f"none usable ({PROFILES_ENV} is malformed; the operator must fix it)"
    if not found:
        return f"none defined (the operator defines them in {PROFILES_ENV})"
    return names(found)


def refuse_pool_variable(api_key_env: str, where: str) -> None:
    """Raise ``LMSettingsForbidden`` when ``api_key_env`` is one of the pool's variables."""
    if api_key_env.upper().startswith(POOL_ENV_PREFIX):
        raise LMSettingsForbidden(
            f"{where} names an API key variable starting with {POOL_ENV_PREFIX!r}; those hold "
            "the pool's own settings and secrets and are never used as LM keys"
        )


def api_key(api_key_env: str, worker_id: str, where: str, name_it: bool) -> str:
    """The key held by ``api_key_env``; ``ApiKeyMissing`` when it is unset or empty.

    With ``name_it`` false (a profile's variable) the message leaves the name out and the
    worker's log gives it to the operator.
    """
    key = os.environ.get(api_key_env)
    if key:
        return key
    condition = "empty" if key == "" else "not set"
    if not name_it:
        _log.warning("%s: API key variable %r is %s", where, api_key_env, condition)
        raise ApiKeyMissing(
            f"{where}: its API key variable is {condition} in worker {worker_id!r} (pid "
            f"{os.getpid()}); the operator sets it in the environment the pool starts its "
            "workers with (the worker's log names it)"
        )
    raise ApiKeyMissing(
        f"environment variable {api_key_env!r} ({where}) is {condition} in worker "
        f"{worker_id!r} (pid {os.getpid()}); set it in the environment the pool starts "
        "its workers with (the key itself is never sent over the wire)"
    )
