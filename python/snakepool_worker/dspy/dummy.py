"""The scripted test LM: DSPy's ``DummyLM`` with answers that run out loudly.

A script is a list of ``{output field: value}`` answers, one consumed per LM call (made
with ``acall`` or synchronously), or an object mapping prompt text to such an answer. A
call after the list is used up fails with ``DummyAnswersExhausted`` (DSPy's DummyLM
would answer "No more responses"). With ``follow_examples`` the LM answers from a demo
whose input matches the call, and when none matches, from the script (DSPy's own DummyLM
would fail the call instead).

A list script knows how many of its answers are used (``Script.used``), and a session
snapshot keeps that number so that a restored LM answers on from the same point.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Dict, List, Optional

from ..arguments import InvalidArgument, describe
from .errors import DummyAnswersExhausted
from .loader import load_dspy

_scripted_lm_class: Any = None


class Script:
    """The scripted answers of a dummy LM; raises when used up instead of stopping."""

    def __init__(self, answers: List[Dict[str, Any]]) -> None:
        self._answers = answers
        self._next = 0

    def __iter__(self) -> "Script":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._next >= len(self._answers):
            raise DummyAnswersExhausted(
                f"the dummy LM has used all {len(self._answers)} of its scripted answers; "
                "call configure_lm again with more answers"
            )
        answer = self._answers[self._next]
        self._next += 1
        return answer

    @property
    def used(self) -> int:
        """How many answers have been consumed."""
        return self._next

    def resume(self, used: int) -> None:
        """Continue after the first ``used`` answers, as a script that has consumed them."""
        total = len(self._answers)
        if isinstance(used, bool) or not isinstance(used, int) or not 0 <= used <= total:
            raise ValueError(f"a script of {total} answers cannot resume after {used!r} of them")
        self._next = used


def script_of(lm: Any) -> Optional[Script]:
    """The list script of a dummy LM, or ``None`` (another LM, or a prompt -> answer object)."""
    answers = getattr(lm, "answers", None)
    return answers if isinstance(answers, Script) else None


def scripted_lm_class() -> Any:
    """``DummyLM`` with a script that fails when used up and a ``follow_examples`` fallback."""
    global _scripted_lm_class
    if _scripted_lm_class is None:
        load_dspy()
        from dspy.utils.dummies import DummyLM

        class ScriptedLM(DummyLM):  # type: ignore[misc, valid-type]
            """A DummyLM: scripted answers, or a matching demo's outputs with follow_examples.

            With ``follow_examples`` and a non-empty script, a call whose input matches no
            demo takes the next scripted answer instead of failing. ``acall`` (DSPy's async
            dummy engine) and ``aforward`` (DummyLM's, which calls ``forward``) answer from
            the same script as the synchronous calls.
            """

            def __init__(self, answers: Any, follow_examples: bool = False) -> None:
                super().__init__(answers, follow_examples=follow_examples)
                if isinstance(answers, list):
                    self.answers = Script(answers)
                self.fallback = follow_examples and bool(answers)
                _unlink_engine(self)

            def _use_example(self, messages: Any) -> Any:
                found = super()._use_example(messages)
                if found is not None or not self.fallback:
                    return found
                if isinstance(self.answers, dict):
                    last = messages[-1]["content"]
                    for key, answer in self.answers.items():
                        if key in last:
                            return self._format_answer_fields(answer)
                    return "No more responses"
                return self._format_answer_fields(next(self.answers))

        _scripted_lm_class = ScriptedLM
    return _scripted_lm_class


class WeakOwner:
    """Stands for a DummyLM as its engine's ``owner`` without keeping the LM alive.

    DummyLM's engine holds its LM and the LM holds its engine: a reference cycle, so a
    dropped LM would stay in memory until the next full run of the cyclic collector
    instead of going with its session. The engine is used only through its LM (which is
    then alive, held by whatever runs it), and reads only attributes of its owner, which
    this forwards: every name but those of this class (its slot and methods, and
    ``object``'s), without looking for it here first, since a failed look-up costs an
    exception. In a deep copy of the LM, the copied engine stands for the copied LM.
    """

    __slots__ = ("_lm",)

    def __init__(self, lm: Any) -> None:
        self._lm = weakref.ref(lm)

    def __getattribute__(self, name: str) -> Any:
        if name in _WEAK_OWNER_NAMES:
            return object.__getattribute__(self, name)
        lm = object.__getattribute__(self, "_lm")()
        if lm is None:
            raise ReferenceError("the dummy LM of this engine no longer exists")
        return getattr(lm, name)

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        lm = self._lm()
        copied = memo.get(id(lm))
        if copied is not None:
            return WeakOwner(copied)
        return copy.deepcopy(lm, memo)


_WEAK_OWNER_NAMES = frozenset(dir(WeakOwner))
"""The names a ``WeakOwner`` answers for itself."""


def _unlink_engine(lm: Any) -> None:
    """Make the engine of a new DummyLM refer to it weakly (see ``WeakOwner``).

    DSPy has no public way to give a DummyLM its engine, hence the private
    ``_engine_spec``; where it is missing or holds something else (another DSPy
    version), nothing changes and the cyclic collector frees the LM.
    """
    engine = vars(lm).get("_engine_spec")
    if engine is not None and getattr(engine, "owner", None) is lm:
        engine.owner = WeakOwner(lm)


def dummy_answers(command: str, answers: Any) -> Any:
    """A copy of a script given as ``args.answers`` (``None``: an empty list)."""
    if answers is None:
        return []
    if isinstance(answers, list):
        for i, answer in enumerate(answers):
            if not isinstance(answer, dict):
                raise InvalidArgument(
                    f"{command}: args.answers[{i}] must be an object of output field -> value, "
                    f"got {describe(answer)}"
                )
        return copy.deepcopy(answers)
    if isinstance(answers, dict):
        for key, answer in answers.items():
            if not isinstance(answer, dict):
                raise InvalidArgument(
                    f"{command}: args.answers[{key!r}] must be an object of output field -> "
                    f"value, got {describe(answer)}"
                )
        return copy.deepcopy(answers)
    raise InvalidArgument(
        f"{command}: args.answers must be a list of objects (one per LM call) or an object "
        f"mapping prompt text to an answer object, got {describe(answers)}"
    )
