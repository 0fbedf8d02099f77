"""``configure_lm``: the session's language model, from a profile, a script or (if allowed)
the client's own settings.

- ``{profile, temperature?, max_tokens?}``: the operator's profile (see ``policy``); the
  client may set temperature and max_tokens only (max_tokens at most the profile's, when
  it sets one). The result never shows the profile's endpoint or key variable.
- ``{provider: "dummy", answers?, follow_examples?}``: the scripted test LM (see
  ``dummy``); always allowed, it makes no network call.
- ``{model, api_base?, api_key_env?, temperature?, max_tokens?, num_retries?, cache?}``:
  only with ``SNAKEPOOL_LM_CLIENT_SETTINGS=allow``, else ``LMSettingsForbidden``; the
  response cache is always off for it (``cache: true`` is refused).

A key variable starting with ``SNAKEPOOL_`` is refused in every form. The session keeps
the arguments it accepted (``SessionState.lm_settings``): a session snapshot holds them,
and restoring it configures the same LM again (see ``snapshot``).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

from ..arguments import (
    InvalidArgument,
    check_known,
    get_bool,
    get_int,
    get_number,
    get_str,
    names,
    quoted,
)
from ..registry import Context
from .caches import profile_cache
from .dummy import dummy_answers, scripted_lm_class
from .errors import LMProfileNotFound, LMSettingsForbidden
from .loader import load_dspy
from .policy import (
    CLIENT_SETTINGS_ENV,
    DEFAULT_NUM_RETRIES,
    ENV_NAME,
    PROFILE_KEYS,
    LMProfile,
    api_key,
    client_settings_allowed,
    lm_profiles,
    profile_names,
    refuse_pool_variable,
)
from .state import SessionState, session_state

PROVIDERS: Tuple[str, ...] = ("litellm", "dummy")

_DIRECT_ARGS = ("provider",) + PROFILE_KEYS
"""What a client may give ``configure_lm`` when client LM settings are allowed: what a
profile holds."""
_DUMMY_ARGS = ("provider", "model", "answers", "follow_examples")
_PROFILE_ARGS = ("profile", "temperature", "max_tokens")
_PROFILE_FIXED = ("model", "api_base", "api_key_env", "num_retries", "cache")


def configure_lm(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Set the session's language model: {profile, ...}, {provider: "dummy"} or {model, ...}."""
    return set_session_lm(session_state(ctx), args, ctx.command, ctx.worker_id)


def set_session_lm(
    state: SessionState, args: Dict[str, Any], command: str, worker_id: str
) -> Dict[str, Any]:
    """Install the LM ``args`` (``configure_lm``'s arguments) describe in ``state``; return
    its info. ``command`` and ``worker_id`` name the caller in errors."""
    if args.get("profile") is not None:
        return _configure_profile(state, command, worker_id, args)
    provider = get_str(command, args, "provider", None)
    model = get_str(command, args, "model", None)
    if provider is None:
        provider = "dummy" if model == "dummy" else "litellm"
    if provider not in PROVIDERS:
        raise InvalidArgument(
            f"{command}: unknown provider {provider!r}; allowed: {names(PROVIDERS)}"
        )
    # Arguments are checked before DSPy is imported: a mistake costs no import.
    if provider == "dummy":
        return _configure_dummy(state, command, args, model)
    if model is None:
        direct = ", or args.model" if client_settings_allowed() else ""
        raise InvalidArgument(
            f"{command}: args.profile is required (profiles: {profile_names()}){direct}; "
            'or provider "dummy" for a scripted test model'
        )
    if not client_settings_allowed():
        raise LMSettingsForbidden(
            f"{command}: this pool takes no LM settings (model, api_base, api_key_env, "
            f'cache) from clients; use a profile: {{"profile": NAME}} with NAME one of: '
            f"{profile_names()}. The operator can allow client LM settings with "
            f"{CLIENT_SETTINGS_ENV}=allow"
        )
    return _configure_direct(state, command, worker_id, args, model)


def _accepted(args: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of the arguments ``configure_lm`` accepted, without the session id and nulls:
    what configures the same LM again."""
    return {
        key: copy.deepcopy(value)
        for key, value in args.items()
        if key != "session_id" and value is not None
    }


def _configure_dummy(
    state: SessionState, command: str, args: Dict[str, Any], model: Optional[str]
) -> Dict[str, Any]:
    check_known(command, args, _DUMMY_ARGS)
    if model not in (None, "dummy"):
        raise InvalidArgument(
            f"{command}: provider 'dummy' takes no model (or model 'dummy'), got {model!r}"
        )
    answers = dummy_answers(command, args.get("answers"))
    follow_examples = get_bool(command, args, "follow_examples", False)
    lm = scripted_lm_class()(answers, follow_examples=follow_examples)
    # One scripted answer per LM call: no second call through the JSON adapter.
    adapter = load_dspy().ChatAdapter(use_json_adapter_fallback=False)
    info = {
        "provider": "dummy",
        "model": "dummy",
        "answers": len(answers),
        "follow_examples": follow_examples,
    }
    state.set_lm(lm, info, _accepted(args), adapter)
    return dict(info)


def _make_lm(command: str, model: str, kwargs: Dict[str, Any]) -> Any:
    dspy = load_dspy()
    lm_error = getattr(dspy, "LMError", ValueError)
    try:
        return dspy.LM(model, **kwargs)
    except (ValueError, TypeError, lm_error) as exc:
        raise InvalidArgument(f"{command}: DSPy rejected the LM settings: {exc}") from None


def _configure_profile(
    state: SessionState, command: str, worker_id: str, args: Dict[str, Any]
) -> Dict[str, Any]:
    name = get_str(command, args, "profile")
    fixed = [key for key in _PROFILE_FIXED if key in args]
    if fixed:
        raise LMSettingsForbidden(
            f"{command}: profile {name!r} fixes the model, endpoint, key, retries and cache; "
            f"with a profile a client may set only temperature and max_tokens, got "
            f"{quoted(fixed)}"
        )
    check_known(command, args, _PROFILE_ARGS)
    temperature = get_number(command, args, "temperature")
    max_tokens = get_int(command, args, "max_tokens", None, minimum=1)
    profile = lm_profiles().get(name)
    if profile is None:
        raise LMProfileNotFound(f"{command}: no LM profile {name!r}; profiles: {profile_names()}")
    where = f"profile {name!r}"
    if max_tokens is not None and profile.max_tokens is not None:
        if max_tokens > profile.max_tokens:
            raise LMSettingsForbidden(
                f"{command}: max_tokens {max_tokens} is above the limit of {where} "
                f"({profile.max_tokens})"
            )
    lm, info, cache = profile_lm(command, profile, worker_id, where, temperature, max_tokens)
    state.set_lm(lm, info, _accepted(args), None, cache)
    return dict(info)


def profile_lm(
    command: str,
    profile: LMProfile,
    worker_id: str,
    where: str,
    temperature: Optional[float] = None,
    max_tokens: Optional[int] = None,
) -> Tuple[Any, Dict[str, Any], Any]:
    """``(lm, info, response cache or None)`` for ``profile``; ``temperature`` and
    ``max_tokens`` (checked by the caller) replace the profile's when given.

    ``where`` names the profile's user in the errors (``ApiKeyMissing`` ...).
    """
    if profile.api_key_env is not None:
        refuse_pool_variable(profile.api_key_env, where)
    if temperature is None:
        temperature = profile.temperature
    if max_tokens is None:
        max_tokens = profile.max_tokens
    kwargs: Dict[str, Any] = {"cache": profile.cache, "num_retries": profile.num_retries}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if profile.api_base is not None:
        kwargs["api_base"] = profile.api_base
    if profile.api_key_env is not None:
        kwargs["api_key"] = api_key(profile.api_key_env, worker_id, where, name_it=False)
    elif profile.api_base is not None:
        # No key variable named: litellm would send the provider's usual one
        # (OPENAI_API_KEY, ...) to this endpoint.
        kwargs["api_key"] = NO_KEY
    cache = profile_cache(profile, load_dspy()) if profile.cache else None
    lm = _make_lm(command, profile.model, kwargs)
    info = {
        "provider": "litellm",
        "profile": profile.name,
        "model": profile.model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "num_retries": profile.num_retries,
        "cache": profile.cache,
    }
    return lm, info, cache


NO_KEY = "no-key"
"""The key sent to a client-named endpoint when the client named no key variable."""


def _configure_direct(
    state: SessionState, command: str, worker_id: str, args: Dict[str, Any], model: str
) -> Dict[str, Any]:
    check_known(command, args, _DIRECT_ARGS)
    api_base = get_str(command, args, "api_base", None)
    api_key_env = get_str(command, args, "api_key_env", None)
    temperature = get_number(command, args, "temperature")
    max_tokens = get_int(command, args, "max_tokens", None, minimum=1)
    num_retries = get_int(command, args, "num_retries", DEFAULT_NUM_RETRIES)
    if get_bool(command, args, "cache", False):
        raise LMSettingsForbidden(
            f"{command}: an LM configured by a client never uses the response cache (its "
            "answers must not reach other clients); drop args.cache, or use a profile whose "
            "operator enabled caching"
        )
    kwargs: Dict[str, Any] = {"cache": False, "num_retries": num_retries}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if api_base is not None:
        kwargs["api_base"] = api_base
    if api_key_env is not None:
        if not ENV_NAME.match(api_key_env):
            raise InvalidArgument(
                f"{command}: args.api_key_env must name an environment variable (letters, "
                f"digits, underscores), got {api_key_env!r}"
            )
        refuse_pool_variable(api_key_env, f"{command}: args.api_key_env")
        kwargs["api_key"] = api_key(api_key_env, worker_id, "args.api_key_env", name_it=True)
    elif api_base is not None:
        # Without a key of its own, litellm would fall back to the provider's usual
        # variable (OPENAI_API_KEY, ...) and send the operator's key to the client's
        # endpoint.
        kwargs["api_key"] = NO_KEY
    lm = _make_lm(command, model, kwargs)
    info = {
        "provider": "litellm",
        "model": model,
        "api_base": api_base,
        "api_key_env": api_key_env,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "num_retries": num_retries,
        "cache": False,
    }
    state.set_lm(lm, info, _accepted(args), None)
    return dict(info)
