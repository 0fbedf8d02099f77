"""Response caches: one per LM profile that asks for one, and none for anything else.

DSPy keeps one process-wide response cache, ``dspy.cache``, built on its first read (not
at import) with a disk part in ``$DSPY_CACHEDIR`` or ``~/.dspy_cache`` shared by every
process of the machine, and its key leaves out the endpoint and the API key. DSPy looks
``dspy.cache`` up on every cached LM call, so:

- ``keep_default_cache_off_home`` puts ``NO_STORE`` there when DSPy is loaded (unless a
  cache was configured already), so the default one is never built;
- ``response_cache`` puts the cache of the LM about to run there for one command, and the
  previous one back after (a worker serves one call at a time);
- ``profile_cache`` gives each profile with ``cache: true`` its own cache: in memory
  (``PROFILE_CACHE_ENTRIES``), plus on disk in ``$SNAKEPOOL_LM_CACHE_DIR/<profile>`` when
  that is set, shared by the sessions of that profile on this worker and nobody else.

The functions take the ``dspy`` module as an argument; none imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Iterator, Tuple

from .errors import LMProfileInvalid
from .policy import CACHE_DIR_ENV, LMProfile

PROFILE_CACHE_ENTRIES = 10_000
"""In-memory entries of one profile's response cache (least recently used are dropped)."""

_MISSING = object()
_log = logging.getLogger(__package__)


class NoStore:
    """Stands in for ``dspy.cache`` where a call must neither read nor write a cache."""

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


NO_STORE = NoStore()
"""The response cache of every LM that has no cache of its own: it stores nothing."""

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


def _lock(dspy: Any) -> Any:
    return vars(dspy).get("_cache_lock") or contextlib.nullcontext()


@contextlib.contextmanager
def response_cache(dspy: Any, cache: Any) -> Iterator[None]:
    """Make ``cache`` (``None``: ``NO_STORE``) DSPy's response cache inside the block."""
    namespace = vars(dspy)
    with _lock(dspy):
        previous = namespace.get("cache", _MISSING)
        namespace["cache"] = NO_STORE if cache is None else cache
    try:
        yield
    finally:
        with _lock(dspy):
            if previous is _MISSING:
                namespace.pop("cache", None)
            else:
                namespace["cache"] = previous


def keep_default_cache_off_home(dspy: Any) -> None:
    """Install ``NO_STORE`` as ``dspy.cache`` unless a cache is there already."""
    with _lock(dspy):
        vars(dspy).setdefault("cache", NO_STORE)
