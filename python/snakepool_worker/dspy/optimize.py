"""``optimize_program``: compile a program on a trainset with a few-shot optimizer.

``bootstrap_few_shot`` runs ``dspy.BootstrapFewShot`` (the session's LM answers the
trainset; the answers that pass the metric become demos), ``labeled_few_shot`` runs
``dspy.LabeledFewShot`` (the trainset itself becomes demos, no LM). The host journals
the resulting state (``load_program_state``) instead of the call, so a rebuilt session
gets the same program without running the optimizer again.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Dict, Iterator, List, Tuple

from ..arguments import InvalidArgument, check_known, get_int, get_str, names, quoted
from ..registry import Context
from .errors import UnknownMetric
from .loader import load_dspy
from .programs import dump_state, examples, jsonable
from .state import find_program, require_lm, run, session_state

METRICS: Tuple[str, ...] = ("exact_match", "contains")
OPTIMIZERS: Tuple[str, ...] = ("bootstrap_few_shot", "labeled_few_shot")
DEFAULT_MAX_BOOTSTRAPPED_DEMOS = 4
DEFAULT_MAX_LABELED_DEMOS = 16
DEFAULT_LABELED_K = 16


def _text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(jsonable(value), sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    return " ".join(text.split()).casefold()


def _make_metric(name: str, output_names: List[str]) -> Callable[..., bool]:
    def fields(example: Any, prediction: Any) -> Iterator[Tuple[str, str]]:
        for field in output_names:
            predicted = prediction.get(field) if hasattr(prediction, "get") else None
            yield _text(example[field]), "" if predicted is None else _text(predicted)

    if name == "exact_match":

        def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
            return all(expected == got for expected, got in fields(example, prediction))

        return exact_match

    def contains(example: Any, prediction: Any, trace: Any = None) -> bool:
        return all(expected in got for expected, got in fields(example, prediction))

    return contains


class _NoProgressBars:
    """Stands in for the ``tqdm`` module: ``tqdm.tqdm(iterable)`` returns the iterable."""

    @staticmethod
    def tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        return iterable


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keep the optimizer's tqdm progress bar out of stderr, the worker's log channel.

    ``BootstrapFewShot`` draws one over the trainset and offers no switch (tqdm reads
    ``TQDM_DISABLE`` only when it is imported). Its module's ``tqdm`` is swapped for the
    duration of the call (a worker serves one call at a time) and restored afterwards.
    """
    load_dspy()
    import dspy.teleprompt.bootstrap as bootstrap

    original = getattr(bootstrap, "tqdm", None)
    if original is None or not callable(getattr(original, "tqdm", None)):
        yield
        return
    bootstrap.tqdm = _NoProgressBars
    try:
        yield
    finally:
        bootstrap.tqdm = original


_OPTIMIZE_ARGS = (
    "program_id",
    "trainset",
    "metric",
    "optimizer",
    "max_bootstrapped_demos",
    "max_labeled_demos",
    "k",
)


def optimize_program(args: Dict[str, Any], ctx: Context) -> Dict[str, Any]:
    """Compile a program with BootstrapFewShot or LabeledFewShot on args.trainset."""
    state = session_state(ctx)
    command = ctx.command
    check_known(command, args, _OPTIMIZE_ARGS)
    program = find_program(state, ctx, args)
    optimizer = get_str(command, args, "optimizer", "bootstrap_few_shot")
    if optimizer not in OPTIMIZERS:
        raise InvalidArgument(
            f"{command}: unknown optimizer {optimizer!r}; allowed: {names(OPTIMIZERS)}"
        )
    metric = get_str(command, args, "metric", "exact_match")
    if metric not in METRICS:
        raise UnknownMetric(f"unknown metric {metric!r}; allowed: {names(METRICS)}")
    if optimizer == "labeled_few_shot":
        wrong: List[str] = [
            key for key in ("max_bootstrapped_demos", "max_labeled_demos") if key in args
        ]
    else:
        wrong = ["k"] if "k" in args else []
    if wrong:
        raise InvalidArgument(
            f"{command}: argument(s) {quoted(wrong)} do not apply to optimizer {optimizer!r}"
        )
    trainset = examples(command, args.get("trainset"), "trainset", program)
    if not trainset:
        raise InvalidArgument(f"{command}: args.trainset is empty")
    dspy = load_dspy()
    if optimizer == "bootstrap_few_shot":
        require_lm(state, ctx)
        teleprompter = dspy.BootstrapFewShot(
            metric=_make_metric(metric, [field.name for field in program.outputs]),
            max_bootstrapped_demos=get_int(
                command, args, "max_bootstrapped_demos", DEFAULT_MAX_BOOTSTRAPPED_DEMOS
            ),
            max_labeled_demos=get_int(
                command, args, "max_labeled_demos", DEFAULT_MAX_LABELED_DEMOS
            ),
        )
    else:
        teleprompter = dspy.LabeledFewShot(k=get_int(command, args, "k", DEFAULT_LABELED_K))
    with _no_progress_bars():
        compiled = run(state, lambda: teleprompter.compile(program.module, trainset=trainset))
    # DSPy flags a compiled module and will not compile it again. The same program rebuilt
    # from its state (a replayed journal, a restored snapshot) has no flag: drop it here too,
    # so that a session and its rebuilt copy both take another optimizer run.
    compiled._compiled = False
    program.module = compiled
    dumped = dump_state(program)
    ctx.journal_as("load_program_state", {"program_id": program.program_id, "state": dumped})
    return {
        "program_id": program.program_id,
        "optimizer": optimizer,
        "demos": program.demo_count(),
        "state": dumped,
    }
