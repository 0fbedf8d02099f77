"""DSPy in a session: thin wrappers over the commands of ``snakepool_worker.dspy``.

Each method sends one command with the arguments it names (those left ``None`` are not
sent, so the worker's defaults apply) and returns its result; failures are
``WorkerError`` with the DSPy module's error type as ``python_type``
(``ProgramNotFound``, ``MissingInput``, ``LMNotConfigured``, ``LMSettingsForbidden``, ...).
Programs and LM settings belong to the session and are rebuilt with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:
    from .aio import AsyncCallStream, AsyncSession
    from .sync import CallStream, Session

Signature = Union[str, Mapping[str, Any]]
"""``"question -> answer: int"``, or ``{instructions?, inputs: [{name, type?, desc?}],
outputs: [...]}``; types ``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``dict``."""

Record = Mapping[str, Any]
"""An example: every input and output field of a program (and, for a chain of thought,
optionally ``reasoning``)."""


def _given(**arguments: Any) -> Dict[str, Any]:
    """The arguments that are not ``None``."""
    return {name: value for name, value in arguments.items() if value is not None}


def _lm_args(
    profile: Optional[str],
    provider: Optional[str],
    model: Optional[str],
    answers: Optional[Union[Sequence[Record], Mapping[str, Record]]],
    follow_examples: Optional[bool],
    temperature: Optional[float],
    max_tokens: Optional[int],
    api_base: Optional[str],
    api_key_env: Optional[str],
    num_retries: Optional[int],
    cache: Optional[bool],
) -> Dict[str, Any]:
    return _given(
        profile=profile,
        provider=provider,
        model=model,
        answers=None if answers is None else _json_answers(answers),
        follow_examples=follow_examples,
        temperature=temperature,
        max_tokens=max_tokens,
        api_base=api_base,
        api_key_env=api_key_env,
        num_retries=num_retries,
        cache=cache,
    )


def _json_answers(answers: Union[Sequence[Record], Mapping[str, Record]]) -> Any:
    if isinstance(answers, Mapping):
        return {prompt: dict(answer) for prompt, answer in answers.items()}
    return [dict(answer) for answer in answers]


def _program_args(
    signature: Signature,
    kind: str,
    instructions: Optional[str],
    demos: Optional[Sequence[Record]],
    state: Optional[Mapping[str, Any]],
    program_id: Optional[str],
) -> Dict[str, Any]:
    return _given(
        signature=signature if isinstance(signature, str) else dict(signature),
        type=kind,
        instructions=instructions,
        demos=None if demos is None else [dict(demo) for demo in demos],
        state=None if state is None else dict(state),
        program_id=program_id,
    )


def _optimize_args(
    program_id: str,
    trainset: Sequence[Record],
    optimizer: Optional[str],
    metric: Optional[str],
    max_bootstrapped_demos: Optional[int],
    max_labeled_demos: Optional[int],
    k: Optional[int],
) -> Dict[str, Any]:
    return _given(
        program_id=program_id,
        trainset=[dict(example) for example in trainset],
        optimizer=optimizer,
        metric=metric,
        max_bootstrapped_demos=max_bootstrapped_demos,
        max_labeled_demos=max_labeled_demos,
        k=k,
    )


def _execute_args(program_id: str, inputs: Mapping[str, Any], stream: bool) -> Dict[str, Any]:
    arguments: Dict[str, Any] = {"program_id": program_id, "inputs": dict(inputs)}
    if stream:
        arguments["stream"] = True
    return arguments


class Dspy:
    """The DSPy commands of a ``Session``."""

    def __init__(self, session: "Session") -> None:
        self._session = session

    def configure_lm(
        self,
        profile: Optional[str] = None,
        *,
        provider: Optional[str] = None,
        model: Optional[str] = None,
        answers: Optional[Union[Sequence[Record], Mapping[str, Record]]] = None,
        follow_examples: Optional[bool] = None,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        api_base: Optional[str] = None,
        api_key_env: Optional[str] = None,
        num_retries: Optional[int] = None,
        cache: Optional[bool] = None,
    ) -> Dict[str, Any]:
        """Set the session's LM (``configure_lm``); returns its description.

        One of: an operator's ``profile`` (with ``temperature``/``max_tokens``);
        ``provider="dummy"`` with scripted ``answers`` (a list of ``{output field: value}``,
        one per LM call, or ``{prompt: answer}``) and ``follow_examples``; or, where the
        server allows client LM settings, a litellm ``model`` with ``api_base``,
        ``api_key_env``, ``temperature``, ``max_tokens`` and ``num_retries``.
        """
        return self._session.call(
            "configure_lm",
            _lm_args(
                profile,
                provider,
                model,
                answers,
                follow_examples,
                temperature,
                max_tokens,
                api_base,
                api_key_env,
                num_retries,
                cache,
            ),
        )

    def create_program(
        self,
        signature: Signature,
        *,
        kind: str = "predict",
        instructions: Optional[str] = None,
        demos: Optional[Sequence[Record]] = None,
        state: Optional[Mapping[str, Any]] = None,
        program_id: Optional[str] = None,
    ) -> str:
        """Create a program (``create_program``); returns its id.

        ``kind`` is ``predict`` or ``chain_of_thought``; ``instructions`` go with a string
        signature; ``demos`` (examples) or ``state`` (the ``state`` of ``dump_state``) set
        its few-shot demos; ``program_id`` names it (else the session numbers it).
        """
        reply = self._session.call(
            "create_program", _program_args(signature, kind, instructions, demos, state, program_id)
        )
        return reply["program_id"]

    def execute(
        self, program_id: str, inputs: Mapping[str, Any], *, timeout: Optional[float] = None
    ) -> Dict[str, Any]:
        """Run a program on ``inputs`` (``execute_program``): ``{"outputs": {...},
        "reasoning": text or None, "usage": {...} or None}``."""
        return self._session.call(
            "execute_program", _execute_args(program_id, inputs, False), timeout=timeout
        )

    def run(self, program_id: str, /, **inputs: Any) -> Dict[str, Any]:
        """``execute(program_id, inputs)`` with the inputs as keyword arguments."""
        return self.execute(program_id, inputs)

    def stream(
        self, program_id: str, inputs: Mapping[str, Any], *, timeout: Optional[float] = None
    ) -> "CallStream":
        """Run a program, streaming its string outputs as the LM writes them: chunks
        ``{"field", "predictor", "text"}``, then the result ``execute`` returns."""
        return self._session.stream(
            "execute_program", _execute_args(program_id, inputs, True), timeout=timeout
        )

    def optimize(
        self,
        program_id: str,
        trainset: Sequence[Record],
        *,
        optimizer: Optional[str] = None,
        metric: Optional[str] = None,
        max_bootstrapped_demos: Optional[int] = None,
        max_labeled_demos: Optional[int] = None,
        k: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Compile a program on ``trainset`` (``optimize_program``): ``optimizer``
        ``bootstrap_few_shot`` (the default; ``metric`` ``exact_match`` or ``contains``,
        ``max_bootstrapped_demos``, ``max_labeled_demos``) or ``labeled_few_shot`` (``k``).
        Returns ``{program_id, optimizer, demos, state}``."""
        return self._session.call(
            "optimize_program",
            _optimize_args(
                program_id,
                trainset,
                optimizer,
                metric,
                max_bootstrapped_demos,
                max_labeled_demos,
                k,
            ),
            timeout=timeout,
        )

    def dump_state(self, program_id: str) -> Dict[str, Any]:
        """A program as JSON (``dump_program_state``): ``{program_id, type, signature,
        state}``; what ``serve --program`` serves, and ``state`` is what ``load_state``
        and ``create_program(state=...)`` take."""
        return self._session.call("dump_program_state", {"program_id": program_id})

    def load_state(self, program_id: str, state: Mapping[str, Any]) -> Dict[str, Any]:
        """Load a dumped ``state`` into a program (``load_program_state``):
        ``{program_id, demos}``."""
        return self._session.call(
            "load_program_state", {"program_id": program_id, "state": dict(state)}
        )

    def list_programs(self) -> List[Dict[str, Any]]:
        """The session's programs in creation order (``list_programs``): each
        ``{program_id, type, signature}``."""
        return self._session.call("list_programs")["programs"]

    def program_info(self, program_id: str) -> Dict[str, Any]:
        """A program's type, signature, instructions and number of demos (``get_program_info``)."""
        return self._session.call("get_program_info", {"program_id": program_id})

    def delete_program(self, program_id: str) -> None:
        """Delete a program (``delete_program``)."""
        self._session.call("delete_program", {"program_id": program_id})

    def reset(self) -> Dict[str, Any]:
        """Drop the session's programs and LM (``reset_state``): ``{programs_deleted,
        lm_cleared}``."""
        return self._session.call("reset_state")


class AsyncDspy:
    """The DSPy commands of an ``AsyncSession``; the methods of ``Dspy``, awaited."""

    def __init__(self, session: "AsyncSession") -> None:
        self._session = session

    async def configure_lm(
        self,
        profile: Optional[str] = None,
        *,
        provider: Optional[str] = None,
        model: Optional[str] = None,
        answers: Optional[Union[Sequence[Record], Mapping[str, Record]]] = None,
        follow_examples: Optional[bool] = None,
        temperature: Optional[float] = None,
        max_tokens: Optional[int] = None,
        api_base: Optional[str] = None,
        api_key_env: Optional[str] = None,
        num_retries: Optional[int] = None,
        cache: Optional[bool] = None,
    ) -> Dict[str, Any]:
        """Set the session's LM (see ``Dspy.configure_lm``)."""
        return await self._session.call(
            "configure_lm",
            _lm_args(
                profile,
                provider,
                model,
                answers,
                follow_examples,
                temperature,
                max_tokens,
                api_base,
                api_key_env,
                num_retries,
                cache,
            ),
        )

    async def create_program(
        self,
        signature: Signature,
        *,
        kind: str = "predict",
        instructions: Optional[str] = None,
        demos: Optional[Sequence[Record]] = None,
        state: Optional[Mapping[str, Any]] = None,
        program_id: Optional[str] = None,
    ) -> str:
        """Create a program; returns its id (see ``Dspy.create_program``)."""
        reply = await self._session.call(
            "create_program", _program_args(signature, kind, instructions, demos, state, program_id)
        )
        return reply["program_id"]

    async def execute(
        self, program_id: str, inputs: Mapping[str, Any], *, timeout: Optional[float] = None
    ) -> Dict[str, Any]:
        """Run a program on ``inputs`` (see ``Dspy.execute``)."""
        return await self._session.call(
            "execute_program", _execute_args(program_id, inputs, False), timeout=timeout
        )

    async def run(self, program_id: str, /, **inputs: Any) -> Dict[str, Any]:
        """``execute(program_id, inputs)`` with the inputs as keyword arguments."""
        return await self.execute(program_id, inputs)

    async def stream(
        self, program_id: str, inputs: Mapping[str, Any], *, timeout: Optional[float] = None
    ) -> "AsyncCallStream":
        """Run a program, streaming its string outputs (see ``Dspy.stream``)."""
        return await self._session.stream(
            "execute_program", _execute_args(program_id, inputs, True), timeout=timeout
        )

    async def optimize(
        self,
        program_id: str,
        trainset: Sequence[Record],
        *,
        optimizer: Optional[str] = None,
        metric: Optional[str] = None,
        max_bootstrapped_demos: Optional[int] = None,
        max_labeled_demos: Optional[int] = None,
        k: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, Any]:
        """Compile a program on ``trainset`` (see ``Dspy.optimize``)."""
        return await self._session.call(
            "optimize_program",
            _optimize_args(
                program_id,
                trainset,
                optimizer,
                metric,
                max_bootstrapped_demos,
                max_labeled_demos,
                k,
            ),
            timeout=timeout,
        )

    async def dump_state(self, program_id: str) -> Dict[str, Any]:
        """A program as JSON (see ``Dspy.dump_state``)."""
        return await self._session.call("dump_program_state", {"program_id": program_id})

    async def load_state(self, program_id: str, state: Mapping[str, Any]) -> Dict[str, Any]:
        """Load a dumped ``state`` into a program (see ``Dspy.load_state``)."""
        return await self._session.call(
            "load_program_state", {"program_id": program_id, "state": dict(state)}
        )

    async def list_programs(self) -> List[Dict[str, Any]]:
        """The session's programs in creation order (see ``Dspy.list_programs``)."""
        return (await self._session.call("list_programs"))["programs"]

    async def program_info(self, program_id: str) -> Dict[str, Any]:
        """A program's type, signature, instructions and number of demos."""
        return await self._session.call("get_program_info", {"program_id": program_id})

    async def delete_program(self, program_id: str) -> None:
        """Delete a program."""
        await self._session.call("delete_program", {"program_id": program_id})

    async def reset(self) -> Dict[str, Any]:
        """Drop the session's programs and LM (see ``Dspy.reset``)."""
        return await self._session.call("reset_state")
