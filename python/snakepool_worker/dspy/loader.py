"""DSPy, imported on first use: importing the command module must stay cheap.

LiteLLM is never imported here; DSPy imports it only if a model needs it, on that model's
first call.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .caches import install_router

# Advisory model metadata (prices, context windows) is otherwise fetched from the
# internet on the first real LM call, by DSPy and by LiteLLM; the bundled copy will do.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_dspy_module: Optional[Any] = None


def load_dspy() -> Any:
    """Import DSPy on first use and return the module.

    Its default response cache is replaced, before anything can read it, by the cache that
    routes each program run to its LM's own cache (see ``caches``).
    """
    global _dspy_module
    if _dspy_module is None:
        import dspy

        install_router(dspy)
        _dspy_module = dspy
    return _dspy_module
