"""Response caches: one per LM profile that asks for one, and none for anything else.

DSPy keeps one process-wide response cache, ``dspy.cache``, built on its first read (not
at import) with a disk part in ``$DSPY_CACHEDIR`` or ``~/.dspy_cache`` shared by every
process of the machine, and its key leaves out the endpoint and the API key. DSPy 3.4 has
no per-LM cache: every cached LM call reads and writes whatever ``dspy.cache`` is at that
moment (``get`` and ``put`` only). Replacing ``dspy.cache`` around a call is not safe when
calls overlap on one event loop, so the cache is chosen per call instead:

- ``install_router`` makes ``NO_STORE`` DSPy's ``dspy.cache`` once, when DSPy is loaded,
  before anything can build the default one (and again if something replaces it later);
- a program runs under ``dspy.context(**cache_setting(cache))``, which puts its LM's
  cache (``None``: no cache) into DSPy's own per-task settings, the same contextvar that
  carries the run's LM: it follows the call into ``asyncio`` tasks, ``asyncio.to_thread``
  and DSPy's thread pools, and no other call sees it;
- ``NO_STORE`` holds nothing itself: inside a run it passes each read and write to that
  run's cache, or stores nothing when the run's LM has none; outside any run it stores
  nothing (or uses the cache something configured before DSPy was loaded here);
- ``profile_cache`` gives each profile with ``cache: true`` its own cache: in memory
  (``PROFILE_CACHE_ENTRIES``), plus on disk in ``$SNAKEPOOL_LM_CACHE_DIR/<profile>`` when
  that is set, shared by the sessions of that profile on this worker and nobody else.

The functions take the ``dspy`` module as an argument; none imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Optional, Tuple

from .errors import LMProfileInvalid
from .policy import CACHE_DIR_ENV, LMProfile

PROFILE_CACHE_ENTRIES = 10_000
"""In-memory entries of one profile's response cache (least recently used are dropped)."""

CACHE_SETTING = "snakepool_response_cache"
"""The key of the running LM's response cache in DSPy's per-task settings."""

_MISSING = object()
_log = logging.getLogger(__package__)


class NoStore:
    """A response cache that neither reads nor writes anything."""

    enable_memory_cache = False
    enable_disk_cache = False

    def get(self, request: Any, ignored_args_for_cache_key: Any = None) -> None:
        return None

    def put(self, request: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def __contains__(self, key: object) -> bool:
        return False

    def reset_memory_cache(self) -> None:
        return None


_NOTHING = NoStore()


class CacheRouter:
    """``dspy.cache`` once DSPy is loaded: the running call's own cache, or nothing.

    Holds no entries itself. ``get`` and ``put`` (all DSPy asks of ``dspy.cache``) go to
    the cache named by ``CACHE_SETTING`` in the calling task's DSPy settings; inside a
    run of an LM without a cache they store nothing. Outside every run they go to
    ``outside``: the cache configured before DSPy was loaded here, or nothing.
    """

    def __init__(self) -> None:
        self.settings: Any = None
        self.outside: Any = _NOTHING

    def current(self) -> Any:
        """The cache of the call running in this task or thread."""
        settings = self.settings
        if settings is None:
            return self.outside
        cache = settings.get(CACHE_SETTING, _MISSING)
        if cache is _MISSING:
            return self.outside
        return _NOTHING if cache is None else cache

    @property
    def enable_memory_cache(self) -> bool:
        return bool(getattr(self.current(), "enable_memory_cache", False))

    @property
    def enable_disk_cache(self) -> bool:
        return bool(getattr(self.current(), "enable_disk_cache", False))

    def get(self, request: Any, ignored_args_for_cache_key: Any = None) -> Any:
        return self.current().get(request, ignored_args_for_cache_key)

    def put(self, request: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        self.current().put(request, value, *args, **kwargs)

    def __contains__(self, key: object) -> bool:
        return key in self.current()

    def reset_memory_cache(self) -> None:
        self.current().reset_memory_cache()


NO_STORE = CacheRouter()
"""DSPy's ``dspy.cache`` once DSPy is loaded here: it stores nothing itself, and passes a
program run's reads and writes to the cache of that run's LM (see ``CacheRouter``)."""

_profile_caches: Dict[Tuple[Any, ...], Any] = {}


def profile_cache(profile: LMProfile, dspy: Any) -> Any:
    """The response cache of ``profile`` on this worker, created on first use.

    A profile whose endpoint, key variable or settings change gets a new cache object;
    ``LMProfileInvalid`` when the disk part cannot be opened (the log says why).
    """
    root = os.environ.get(CACHE_DIR_ENV, "").strip()
    key = profile.identity() + (root,)
    cache = _profile_caches.get(key)
    if cache is not None:
        return cache
    from dspy.clients import DISK_CACHE_LIMIT, Cache

    directory = os.path.join(root, profile.name) if root else None
    try:
        cache = Cache(
            enable_disk_cache=directory is not None,
            enable_memory_cache=True,
            disk_cache_dir=directory,
            disk_size_limit_bytes=DISK_CACHE_LIMIT,
            memory_max_entries=PROFILE_CACHE_ENTRIES,
        )
    except Exception as exc:
        _log.error(
            "cannot open the response cache of LM profile %r in %r: %s: %s",
            profile.name,
            directory,
            type(exc).__name__,
            exc,
        )
        raise LMProfileInvalid(
            f"the response cache of profile {profile.name!r} cannot be opened (see the "
            f"worker's log); the operator must fix {CACHE_DIR_ENV}"
        ) from None
    _profile_caches[key] = cache
    return cache


def cache_setting(cache: Optional[Any]) -> Dict[str, Any]:
    """The ``dspy.context`` setting that makes ``cache`` (``None``: none) the run's cache."""
    return {CACHE_SETTING: cache}


def _lock(dspy: Any) -> Any:
    return vars(dspy).get("_cache_lock") or contextlib.nullcontext()


def install_router(dspy: Any) -> None:
    """Make ``NO_STORE`` DSPy's ``dspy.cache``, unless it is already.

    A cache found there (one something configured) stays in use outside program runs.
    Cheap when nothing changed, so it is checked before every run: a cache configured
    later (``dspy.configure_cache``) cannot take the place of the runs' own caches.
    """
    namespace = vars(dspy)
    if namespace.get("cache") is NO_STORE:
        return
    with _lock(dspy):
        found = namespace.get("cache", _MISSING)
        if found is NO_STORE:
            return
        NO_STORE.settings = dspy.settings
        if found is not _MISSING:
            NO_STORE.outside = found
        namespace["cache"] = NO_STORE
