"""The DSPy commands, in-process through ``Runtime.handle_frame``, with DummyLM only."""

from __future__ import annotations

import copy
import gc
import json
import weakref
from typing import Any, Dict, Iterator, List, Optional

import pytest

dspy = pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import LMEnv  # noqa: E402

from snakepool_worker.dspy import ALLOWED_TYPES, COMMAND_NAMES, DEFAULT_NUM_RETRIES  # noqa: E402

MUTATING = {
    "configure_lm",
    "create_program",
    "optimize_program",
    "load_program_state",
    "delete_program",
    "reset_state",
}


@pytest.fixture
def bridge(lm_env: LMEnv) -> Bridge:
    """A fresh runtime; the LM policy variables are cleared (the default policy)."""
    return Bridge()


@pytest.fixture
def allow_client_settings(lm_env: LMEnv) -> None:
    """``SNAKEPOOL_LM_CLIENT_SETTINGS=allow``: clients may pass model, api_base, api_key_env."""
    lm_env.client_settings("allow")


def dummy(bridge: Bridge, answers: Any = None, session: str = "s1", **extra: Any) -> Any:
    return bridge.ok("configure_lm", session, provider="dummy", answers=answers or [], **extra)


ATLANTIS = "What is the capital of Atlantis?"
TRAINSET = [
    {"question": ATLANTIS, "answer": "Poseidonia"},
    {"question": "What colour is the sky?", "answer": "blue"},
    {"question": "What is 2 + 2?", "answer": "4"},
]


# -- configure_lm ----------------------------------------------------------------------------


def test_configure_dummy_lm(bridge: Bridge) -> None:
    assert dummy(bridge, [{"answer": "a"}]) == {
        "provider": "dummy",
        "model": "dummy",
        "answers": 1,
        "follow_examples": False,
    }
    assert bridge.ok("configure_lm", model="dummy", answers={"sky": {"answer": "blue"}})[
        "provider"
    ] == ("dummy")


def test_configure_real_lm_reads_the_key_from_the_worker_environment(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch, allow_client_settings: None
) -> None:
    monkeypatch.setenv("SP_TEST_KEY", "sk-secret-value")
    raw = bridge.raw(
        "configure_lm",
        model="openai/gpt-4o-mini",
        api_base="http://127.0.0.1:9/v1",
        api_key_env="SP_TEST_KEY",
        temperature=0.5,
        max_tokens=300,
    )
    assert b"sk-secret-value" not in raw
    result = json.loads(raw)["result"]
    assert result == {
        "provider": "litellm",
        "model": "openai/gpt-4o-mini",
        "api_base": "http://127.0.0.1:9/v1",
        "api_key_env": "SP_TEST_KEY",
        "temperature": 0.5,
        "max_tokens": 300,
        "num_retries": DEFAULT_NUM_RETRIES,
        "cache": False,
    }
    lm = bridge.state().lm
    assert isinstance(lm, dspy.LM)
    assert lm.model == "openai/gpt-4o-mini"
    assert lm.kwargs["api_key"] == "sk-secret-value"
    assert lm.kwargs["api_base"] == "http://127.0.0.1:9/v1"
    assert lm.kwargs["temperature"] == 0.5 and lm.kwargs["max_tokens"] == 300
    assert lm.cache is False and lm.num_retries == DEFAULT_NUM_RETRIES

    bridge.ok("configure_lm", "s2", model="openai/gpt-4o-mini", num_retries=0, cache=False)
    other = bridge.state("s2").lm
    assert other is not lm, "each session gets its own LM object"
    assert other.num_retries == 0 and other.cache is False
    assert dspy.settings.lm is None, "the global DSPy configuration is never touched"


@pytest.mark.parametrize("value", [None, ""])
def test_missing_api_key_env_var(
    bridge: Bridge,
    monkeypatch: pytest.MonkeyPatch,
    value: Optional[str],
    allow_client_settings: None,
) -> None:
    if value is None:
        monkeypatch.delenv("SP_TEST_NO_KEY", raising=False)
    else:
        monkeypatch.setenv("SP_TEST_NO_KEY", value)
    kind, message = bridge.fail(
        "configure_lm", model="openai/gpt-4o-mini", api_key_env="SP_TEST_NO_KEY"
    )
    assert kind == "ApiKeyMissing"
    assert "'SP_TEST_NO_KEY'" in message
    assert ("not set" if value is None else "empty") in message
    assert bridge.state().lm is None


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            {"provider": "openai", "model": "x"},
            "unknown provider 'openai'; allowed: litellm, dummy",
        ),
        ({"model": "openai/gpt-4o-mini", "temprature": 1}, "unknown argument(s) 'temprature'"),
        ({"provider": "dummy", "temperature": 0.2}, "unknown argument(s) 'temperature'"),
        ({"provider": "dummy", "model": "gpt"}, "provider 'dummy' takes no model"),
        ({}, "args.profile is required (profiles: none defined"),
        ({"provider": "litellm"}, "or args.model; or provider \"dummy\""),
        ({"profile": ""}, "args.profile must be a non-empty string"),
        ({"profile": "p", "temperature": -1}, "temperature must not be negative"),
        ({"profile": "p", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"profile": "p", "seed": 1}, "unknown argument(s) 'seed'"),
        ({"model": "openai/"}, "DSPy rejected the LM settings"),
        ({"model": "m", "num_retries": -1}, "num_retries must be an integer >= 0"),
        ({"model": "m", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"model": "m", "temperature": "hot"}, "temperature must be a number"),
        ({"model": "m", "cache": "yes"}, "cache must be true or false"),
        ({"model": "m", "api_key_env": "not a name"}, "must name an environment variable"),
        ({"provider": "dummy", "answers": "42"}, "args.answers must be a list of objects"),
        ({"provider": "dummy", "answers": ["42"]}, "args.answers[0] must be an object"),
        ({"provider": "dummy", "follow_examples": 1}, "follow_examples must be true or false"),
    ],
)
def test_configure_lm_rejects_bad_arguments(
    bridge: Bridge, args: Dict[str, Any], fragment: str, allow_client_settings: None
) -> None:
    kind, message = bridge.fail("configure_lm", **args)
    assert kind == "InvalidArgument"
    assert fragment in message


def test_configure_lm_replaces_the_previous_lm(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "first"}])
    first = bridge.state().lm
    dummy(bridge, [{"answer": "second"}])
    assert bridge.state().lm is not first
    program = bridge.ok("create_program", signature="question -> answer")["program_id"]
    result = bridge.ok("execute_program", program_id=program, inputs={"question": "q"})
    assert result["outputs"] == {"answer": "second"}


# -- create_program and signatures ------------------------------------------------------------


def test_create_program_from_a_string_signature(bridge: Bridge) -> None:
    result = bridge.ok("create_program", signature="question -> answer")
    assert result == {
        "program_id": "prog_1",
        "type": "predict",
        "signature": {
            "instructions": "Given the fields `question`, produce the fields `answer`.",
            "inputs": [{"name": "question", "type": "str", "desc": ""}],
            "outputs": [{"name": "answer", "type": "str", "desc": ""}],
        },
    }


def test_create_program_with_types_instructions_and_chain_of_thought(bridge: Bridge) -> None:
    result = bridge.ok(
        "create_program",
        signature="question: str, context: list[str] -> answer: int, sure: bool",
        instructions="Count carefully.",
        type="chain_of_thought",
    )
    assert result["program_id"] == "prog_1" and result["type"] == "chain_of_thought"
    signature = result["signature"]
    assert signature["instructions"] == "Count carefully."
    assert [(f["name"], f["type"]) for f in signature["inputs"]] == [
        ("question", "str"),
        ("context", "list[str]"),
    ]
    assert [(f["name"], f["type"]) for f in signature["outputs"]] == [
        ("answer", "int"),
        ("sure", "bool"),
    ]


def test_create_program_from_a_structured_signature(bridge: Bridge) -> None:
    signature = {
        "instructions": "Answer briefly.",
        "inputs": [{"name": "question", "desc": "what is asked", "type": "str"}],
        "outputs": [
            {"name": "answer", "desc": "", "type": "int"},
            {"name": "tags", "desc": "labels", "type": "list[str]"},
            {"name": "meta", "type": "dict"},
            {"name": "score", "type": "float"},
        ],
    }
    result = bridge.ok("create_program", signature=signature)
    assert result["signature"] == {
        "instructions": "Answer briefly.",
        "inputs": [{"name": "question", "type": "str", "desc": "what is asked"}],
        "outputs": [
            {"name": "answer", "type": "int", "desc": ""},
            {"name": "tags", "type": "list[str]", "desc": "labels"},
            {"name": "meta", "type": "dict", "desc": ""},
            {"name": "score", "type": "float", "desc": ""},
        ],
    }
    listed = bridge.ok("list_programs")["programs"]
    assert listed == [
        {
            "program_id": "prog_1",
            "type": "predict",
            "signature": "question -> answer: int, tags: list[str], meta: dict, score: float",
        }
    ]


def test_program_ids_count_per_session_and_skip_explicit_ones(bridge: Bridge) -> None:
    ids = [bridge.ok("create_program", signature="q -> a")["program_id"] for _ in range(2)]
    assert ids == ["prog_1", "prog_2"]
    assert bridge.ok("create_program", signature="q -> a", program_id="prog_3")["program_id"] == (
        "prog_3"
    )
    assert bridge.ok("create_program", signature="q -> a")["program_id"] == "prog_4"
    assert bridge.ok("create_program", "s2", signature="q -> a")["program_id"] == "prog_1"
    # The DSPex spellings of the id and type arguments are accepted.
    legacy = bridge.ok("create_program", signature="q -> a", id="legacy", program_type="predict")
    assert legacy["program_id"] == "legacy"


def test_duplicate_program_id(bridge: Bridge) -> None:
    bridge.ok("create_program", signature="q -> a", program_id="mine")
    kind, message = bridge.fail("create_program", signature="q -> a", program_id="mine")
    assert kind == "InvalidArgument"
    assert "program 'mine' already exists in session 's1'" in message


def test_bad_program_type(bridge: Bridge) -> None:
    kind, message = bridge.fail("create_program", signature="q -> a", type="react")
    assert kind == "InvalidArgument"
    assert message == (
        "create_program: unknown program type 'react'; allowed: predict, chain_of_thought"
    )


@pytest.mark.parametrize(
    "signature, fragment",
    [
        ("garbage", "must contain exactly one '->'"),
        ("q -> a -> b", "must contain exactly one '->'"),
        ("q ->", "has no output fields"),
        ("-> a", "has no input fields"),
        ("q, -> a", "has an empty input field"),
        ("1q -> a", "field name '1q' is not usable"),
        ("class -> a", "field name 'class' is not usable"),
        ("_q -> a", "field name '_q' is not usable"),
        ("q: -> a", "field 'q' has ':' but no type"),
        ("q, q -> a", "field 'q' is declared twice (as input and input)"),
        ("q -> q", "field 'q' is declared twice (as input and output)"),
        ("q -> json", "field name 'json' is reserved"),
        ("q -> instructions", "field name 'instructions' is reserved"),
        (42, "signature must be a string or an object"),
        ({"inputs": [{"name": "q"}]}, "signature.outputs must be a non-empty list"),
        ({"inputs": [], "outputs": [{"name": "a"}]}, "signature.inputs must be a non-empty list"),
        ({"inputs": ["q"], "outputs": [{"name": "a"}]}, "signature.inputs[0] must be an object"),
        (
            {"inputs": [{"name": "q", "kind": "x"}], "outputs": [{"name": "a"}]},
            "signature.inputs[0] has unknown key(s) 'kind'",
        ),
        ({"inputs": [{"name": "q"}], "outputs": [{}]}, "signature.outputs[0]: field name must be"),
        ({"input": [{"name": "q"}], "outputs": [{"name": "a"}]}, "unknown key(s) 'input'"),
        (
            {"instructions": 5, "inputs": [{"name": "q"}], "outputs": [{"name": "a"}]},
            "signature.instructions must be a string",
        ),
    ],
)
def test_bad_signatures(bridge: Bridge, signature: Any, fragment: str) -> None:
    kind, message = bridge.fail("create_program", signature=signature)
    assert kind == "InvalidSignature", message
    assert fragment in message
    assert bridge.ok("list_programs") == {"programs": []}


def test_reasoning_is_reserved_in_chain_of_thought(bridge: Bridge) -> None:
    kind, message = bridge.fail(
        "create_program", signature="question -> reasoning", type="chain_of_thought"
    )
    assert kind == "InvalidSignature" and "'reasoning' is reserved" in message
    bridge.ok("create_program", signature="question -> reasoning")  # fine for predict


@pytest.mark.parametrize(
    "signature, bad",
    [
        ("q -> a: list[int]", "'list[int]'"),
        ("q: tensor -> a", "'tensor'"),
        ("q -> a: dict[str, int]", "'dict[str, int]'"),
        ("q -> a: Optional[str]", "'Optional[str]'"),
        ({"inputs": [{"name": "q", "type": "int64"}], "outputs": [{"name": "a"}]}, "'int64'"),
        ({"inputs": [{"name": "q", "type": 5}], "outputs": [{"name": "a"}]}, "5 (int)"),
    ],
)
def test_unsupported_types(bridge: Bridge, signature: Any, bad: str) -> None:
    kind, message = bridge.fail("create_program", signature=signature)
    assert kind == "UnsupportedType"
    assert f"unsupported type {bad}" in message
    assert message.endswith("allowed types: " + ", ".join(ALLOWED_TYPES))


def test_create_program_argument_errors(bridge: Bridge) -> None:
    assert bridge.fail("create_program") == (
        "InvalidArgument",
        "create_program: args.signature is required: a string such as 'question -> answer' or "
        "an object {instructions?, inputs: [{name, type?, desc?}], outputs: [...]}",
    )
    kind, message = bridge.fail("create_program", signature="q -> a", sig="x")
    assert kind == "InvalidArgument" and "unknown argument(s) 'sig'" in message
    kind, message = bridge.fail(
        "create_program",
        signature={"inputs": [{"name": "q"}], "outputs": [{"name": "a"}]},
        instructions="x",
    )
    assert kind == "InvalidArgument" and "put it in signature.instructions" in message
    kind, message = bridge.fail("create_program", signature="q -> a", program_id="")
    assert kind == "InvalidArgument" and "args.program_id must be a non-empty string" in message
    kind, message = bridge.fail("create_program", signature="q -> a", demos=[], state={"demos": []})
    assert kind == "InvalidArgument" and "give args.demos or args.state, not both" in message


# -- execute_program ---------------------------------------------------------------------------


def test_execute_returns_outputs_typed_as_declared(bridge: Bridge) -> None:
    dummy(
        bridge,
        [
            {"answer": 42, "tags": ["a", "b"], "meta": {"k": [1]}, "sure": True, "score": 0.5},
            {"answer": "7", "tags": '["c"]', "meta": "{}", "sure": "false", "score": "nan"},
        ],
    )
    bridge.ok(
        "create_program",
        signature="question -> answer: int, tags: list[str], meta: dict, sure: bool, score: float",
    )
    raw = bridge.raw("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert b'"answer":42' in raw, "an int field is a JSON number"
    result = json.loads(raw)["result"]
    assert result["outputs"] == {
        "answer": 42,
        "tags": ["a", "b"],
        "meta": {"k": [1]},
        "sure": True,
        "score": 0.5,
    }
    assert result["reasoning"] is None
    assert result["usage"]["dummy"]["total_tokens"] == 0
    second = bridge.ok("execute_program", program_id="prog_1", inputs={"question": "q"})
    # Parsed from text into the declared types; NaN has no JSON form and becomes null.
    assert second["outputs"] == {
        "answer": 7,
        "tags": ["c"],
        "meta": {},
        "sure": False,
        "score": None,
    }


def test_chain_of_thought_returns_its_reasoning(bridge: Bridge) -> None:
    dummy(bridge, [{"reasoning": "Forty plus two.", "answer": "42"}])
    bridge.ok("create_program", signature="question -> answer: int", type="chain_of_thought")
    result = bridge.ok("execute_program", program_id="prog_1", inputs={"question": "40 + 2?"})
    assert result["outputs"] == {"answer": 42}
    assert result["reasoning"] == "Forty plus two."
    assert set(result["usage"]) == {"dummy"}


def test_missing_inputs(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "x"}])
    bridge.ok("create_program", signature="question, context, style -> answer")
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert kind == "MissingInput"
    assert message == (
        "program 'prog_1' is missing input(s) 'context', 'style'; it expects: "
        "question, context, style"
    )


def test_unknown_inputs(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "x"}])
    bridge.ok("create_program", signature="question -> answer")
    kind, message = bridge.fail(
        "execute_program", program_id="prog_1", inputs={"question": "q", "extra": 1}
    )
    assert kind == "UnknownInput"
    assert message == "program 'prog_1' got unknown input(s) 'extra'; it expects: question"
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs={"questoin": "q"})
    assert kind == "UnknownInput"
    assert message.endswith("it expects: question; missing: 'question'")
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs=["q"])
    assert kind == "InvalidArgument" and "args.inputs must be an object" in message
    # Nothing was sent to the LM: its one answer is still there.
    result = bridge.ok("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert result["outputs"] == {"answer": "x"}


def test_no_lm_configured(bridge: Bridge) -> None:
    bridge.ok("create_program", signature="question -> answer")
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert kind == "LMNotConfigured"
    assert message.startswith("execute_program: session 's1' has no language model; call ")
    assert "configure_lm" in message


def test_adapter_errors_fail_clearly_and_consume_one_answer(bridge: Bridge) -> None:
    dummy(bridge, [{"wrong_field": "x"}, {"answer": "fine"}])
    bridge.ok("create_program", signature="question -> answer")
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert kind == "AdapterParseError"
    assert "answer" in message
    result = bridge.ok("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert result["outputs"] == {"answer": "fine"}
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert kind == "DummyAnswersExhausted", "a used-up script fails instead of inventing an answer"
    assert message == (
        "the dummy LM has used all 2 of its scripted answers; call configure_lm again with "
        "more answers"
    )


def test_wrongly_typed_answer_is_an_adapter_error(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "not a number"}])
    bridge.ok("create_program", signature="question -> answer: int")
    kind, message = bridge.fail("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert kind == "AdapterParseError" and "answer" in message


def test_dummy_answers_by_prompt_text(bridge: Bridge) -> None:
    bridge.ok(
        "configure_lm",
        provider="dummy",
        answers={"sky": {"answer": "blue"}, "grass": {"answer": "green"}},
    )
    bridge.ok("create_program", signature="question -> answer")
    for question, answer in (("grass?", "green"), ("sky?", "blue"), ("grass?", "green")):
        result = bridge.ok("execute_program", program_id="prog_1", inputs={"question": question})
        assert result["outputs"] == {"answer": answer}


def test_demos_given_at_creation_are_used(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "scripted"}], follow_examples=True)
    program = bridge.ok("create_program", signature="question -> answer", demos=TRAINSET[:2])
    info = bridge.ok("get_program_info", program_id=program["program_id"])
    assert info["demos"] == 2
    answer = bridge.ok("execute_program", program_id="prog_1", inputs={"question": ATLANTIS})
    assert answer["outputs"] == {"answer": "Poseidonia"}
    # No matching demo: the scripted answer.
    other = bridge.ok("execute_program", program_id="prog_1", inputs={"question": "new?"})
    assert other["outputs"] == {"answer": "scripted"}
    kind, message = bridge.fail(
        "create_program", signature="question -> answer", demos=[{"question": "q"}]
    )
    assert kind == "InvalidArgument"
    assert "args.demos[0] lacks field(s) 'answer'" in message
    kind, message = bridge.fail(
        "create_program",
        signature="question -> answer",
        demos=[{"question": "q", "answer": "a", "extra": 1}],
    )
    assert kind == "InvalidArgument" and "args.demos[0] has unknown field(s) 'extra'" in message


# -- sessions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_dspy_command_requires_a_session(bridge: Bridge, command: str) -> None:
    kind, message = bridge.fail(command, session=None, program_id="prog_1")
    assert kind == "SessionRequired"
    assert message == (
        "DSPy programs live in a session's worker; call through a session "
        f"({command!r} was called without args.session_id)"
    )
    assert bridge.runtime.sessions == {}


def test_commands_and_mutation_flags_in_the_manifest(bridge: Bridge) -> None:
    commands = bridge.runtime.manifest()["commands"]
    assert set(COMMAND_NAMES) == MUTATING | {
        "execute_program",
        "dump_program_state",
        "list_programs",
        "get_program_info",
    }
    for name in COMMAND_NAMES:
        assert commands[name]["mutates_session"] is (name in MUTATING), name
        assert commands[name]["doc"], name


def test_sessions_on_one_worker_are_isolated(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "from one"}] * 3, session="one")
    dummy(bridge, [{"answer": "from two"}] * 3, session="two")
    assert bridge.ok("create_program", "one", signature="question -> answer")["program_id"] == (
        "prog_1"
    )
    assert bridge.ok("create_program", "two", signature="question -> answer")["program_id"] == (
        "prog_1"
    )
    bridge.ok("create_program", "two", signature="question -> answer", program_id="only_two")
    q = {"question": "who are you?"}
    one = bridge.ok("execute_program", "one", program_id="prog_1", inputs=q)
    two = bridge.ok("execute_program", "two", program_id="prog_1", inputs=q)
    assert one["outputs"] == {"answer": "from one"}
    assert two["outputs"] == {"answer": "from two"}
    assert [p["program_id"] for p in bridge.ok("list_programs", "one")["programs"]] == ["prog_1"]
    kind, message = bridge.fail("execute_program", "one", program_id="only_two", inputs=q)
    assert kind == "ProgramNotFound"
    assert message == "no program 'only_two' in session 'one' (its programs: prog_1)"
    # A third session sees neither LM.
    bridge.ok("create_program", "three", signature="question -> answer")
    kind, _ = bridge.fail("execute_program", "three", program_id="prog_1", inputs=q)
    assert kind == "LMNotConfigured"
    assert bridge.state("one").lm is not bridge.state("two").lm
    assert dspy.settings.lm is None


@pytest.mark.parametrize(
    "command, extra",
    [
        ("execute_program", {"inputs": {"question": "q"}}),
        ("get_program_info", {}),
        ("delete_program", {}),
        ("dump_program_state", {}),
        ("load_program_state", {"state": {}}),
        ("optimize_program", {"trainset": TRAINSET}),
    ],
)
def test_unknown_program(bridge: Bridge, command: str, extra: Dict[str, Any]) -> None:
    kind, message = bridge.fail(command, program_id="prog_404", **extra)
    assert kind == "ProgramNotFound"
    assert message == (
        "no program 'prog_404' in session 's1' (it has no programs; create one with "
        "create_program)"
    )


def test_program_id_is_required(bridge: Bridge) -> None:
    assert bridge.fail("get_program_info") == (
        "InvalidArgument",
        "get_program_info: args.program_id is required (a non-empty string)",
    )


def replay_calls(bridge: Bridge) -> List[str]:
    dummy(bridge, [{"answer": "a"}])
    ids = [bridge.ok("create_program", signature="q -> a")["program_id"]]
    ids.append(bridge.ok("create_program", signature="q -> a", program_id="named")["program_id"])
    ids.append(bridge.ok("create_program", signature="q -> a")["program_id"])
    bridge.ok("delete_program", program_id="prog_1")
    ids.append(
        bridge.ok("create_program", signature="q -> a", type="chain_of_thought")["program_id"]
    )
    return ids


def test_program_ids_are_the_same_when_the_calls_are_replayed() -> None:
    first = replay_calls(Bridge())
    assert first == ["prog_1", "named", "prog_2", "prog_3"]
    assert replay_calls(Bridge()) == first


def test_list_info_delete_and_reset(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "a"}])
    bridge.ok("create_program", signature="question -> answer")
    bridge.ok(
        "create_program",
        signature={"instructions": "Think.", "inputs": [{"name": "q"}], "outputs": [{"name": "a"}]},
        type="chain_of_thought",
    )
    assert bridge.ok("list_programs") == {
        "programs": [
            {"program_id": "prog_1", "type": "predict", "signature": "question -> answer"},
            {"program_id": "prog_2", "type": "chain_of_thought", "signature": "q -> a"},
        ]
    }
    assert bridge.ok("get_program_info", program_id="prog_2") == {
        "program_id": "prog_2",
        "type": "chain_of_thought",
        "signature": {
            "instructions": "Think.",
            "inputs": [{"name": "q", "type": "str", "desc": ""}],
            "outputs": [{"name": "a", "type": "str", "desc": ""}],
        },
        "demos": 0,
        "instructions": "Think.",
    }
    assert bridge.ok("delete_program", program_id="prog_1") == {"deleted": "prog_1"}
    assert bridge.fail("delete_program", program_id="prog_1")[0] == "ProgramNotFound"
    assert [p["program_id"] for p in bridge.ok("list_programs")["programs"]] == ["prog_2"]
    assert bridge.ok("reset_state") == {"programs_deleted": 1, "lm_cleared": True}
    assert bridge.ok("reset_state") == {"programs_deleted": 0, "lm_cleared": False}
    assert bridge.ok("list_programs") == {"programs": []}
    assert bridge.ok("create_program", signature="question -> answer")["program_id"] == "prog_1"
    kind, _ = bridge.fail("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert kind == "LMNotConfigured"
    kind, message = bridge.fail("list_programs", verbose=True)
    assert kind == "InvalidArgument" and "unknown argument(s) 'verbose'" in message


def test_cleanup_session_frees_the_sessions_dspy_objects(bridge: Bridge) -> None:
    dummy(bridge, [{"reasoning": "r", "answer": "a"}] * 2)
    bridge.ok("create_program", signature="question -> answer", type="chain_of_thought")
    bridge.ok("execute_program", program_id="prog_1", inputs={"question": "q"})
    bridge.ok(
        "optimize_program", program_id="prog_1", trainset=TRAINSET, optimizer="labeled_few_shot"
    )
    state = bridge.state()
    refs = [weakref.ref(state.lm), weakref.ref(state.programs["prog_1"].module)]
    del state
    assert bridge.ok("cleanup_session", session="s1") == {"session_id": "s1", "existed": True}
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
    assert bridge.runtime.sessions == {}


@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    """The cyclic garbage collector off: only reference counting frees objects."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _session_objects(bridge: Bridge, session: str) -> List["weakref.ref[Any]"]:
    state = bridge.state(session)
    objects: List[Any] = [state.lm, state.lm.answers, state.adapter]
    for program in state.programs.values():
        objects.append(program.module)
        objects.extend(predictor for _, predictor in program.predictors())
    return [weakref.ref(obj) for obj in objects]


def test_cleanup_session_frees_the_sessions_objects_at_once(
    bridge: Bridge, no_cyclic_collector: None
) -> None:
    # Nothing a session holds is in a reference cycle: it is freed as the session is
    # dropped, not at the cyclic collector's next full run.
    dummy(bridge, [{"reasoning": "r", "answer": "a"}] * 3)
    bridge.ok("create_program", signature="question -> answer")
    bridge.ok("create_program", signature="question -> answer", type="chain_of_thought")
    bridge.ok("execute_program", program_id="prog_2", inputs={"question": "q"})
    dumped = bridge.ok("dump_program_state", program_id="prog_1")
    bridge.ok("load_program_state", program_id="prog_1", state=dumped["state"])
    parts = bridge.ok("snapshot_session")["parts"]
    bridge.ok("restore_session", session="s2", parts=parts)
    assert bridge.ok("snapshot_session", session="s2")["parts"] == parts
    for session in ("s1", "s2"):
        refs = _session_objects(bridge, session)
        assert len(refs) == 7
        assert bridge.ok("cleanup_session", session=session)["existed"] is True
        assert [ref() for ref in refs] == [None] * len(refs), session


def test_program_predictors_are_the_modules_named_predictors(bridge: Bridge) -> None:
    dummy(bridge)
    bridge.ok("create_program", signature="question -> answer")
    bridge.ok("create_program", signature="question -> answer", type="chain_of_thought")
    for program in bridge.state().programs.values():
        assert program.predictors() == list(program.module.named_predictors())
        assert program.module.dump_state() == bridge.ok(
            "dump_program_state", program_id=program.program_id
        )["state"]


def test_replacing_the_lm_frees_the_previous_one_at_once(
    bridge: Bridge, no_cyclic_collector: None
) -> None:
    dummy(bridge, [{"answer": "a"}])
    previous = weakref.ref(bridge.state().lm)
    dummy(bridge, [{"answer": "b"}])
    assert previous() is None


def _signature_of(bridge: Bridge, session: str, program_id: str = "prog_1") -> Any:
    return bridge.state(session).programs[program_id].predictors()[0][1].signature


def test_programs_of_one_signature_share_its_class_and_stay_apart(bridge: Bridge) -> None:
    for session in ("s1", "s2"):
        dummy(bridge, [], session=session, follow_examples=True)
        bridge.ok("create_program", session, signature="question -> answer", demos=TRAINSET)
    shared = _signature_of(bridge, "s1")
    assert _signature_of(bridge, "s2") is shared
    # A state that leaves the signature as it is keeps the shared class ...
    state = bridge.ok("dump_program_state", "s2", program_id="prog_1")["state"]
    bridge.ok("load_program_state", "s2", program_id="prog_1", state=state)
    assert _signature_of(bridge, "s2") is shared
    # ... and one that changes it gives that program a class of its own.
    state["signature"]["instructions"] = "Answer in one word."
    bridge.ok("load_program_state", "s1", program_id="prog_1", state=state)
    assert _signature_of(bridge, "s1") is not shared
    info = {s: bridge.ok("get_program_info", s, program_id="prog_1") for s in ("s1", "s2")}
    assert info["s1"]["instructions"] == "Answer in one word."
    assert info["s2"]["instructions"] == str(shared.instructions) != info["s1"]["instructions"]
    assert info["s1"]["demos"] == info["s2"]["demos"] == 3
    # Demos stay each program's own.
    bridge.ok("load_program_state", "s2", program_id="prog_1", state={**state, "demos": []})
    assert bridge.ok("get_program_info", "s1", program_id="prog_1")["demos"] == 3
    result = bridge.ok("execute_program", "s1", program_id="prog_1", inputs={"question": ATLANTIS})
    assert result["outputs"] == {"answer": "Poseidonia"}


def test_a_copied_dummy_lm_answers_from_its_own_script(bridge: Bridge) -> None:
    dummy(bridge, [{"answer": "a"}, {"answer": "b"}])
    lm = bridge.state().lm
    copied = copy.deepcopy(lm)
    program = dspy.Predict("question -> answer")
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    for model, expected in ((copied, "a"), (copied, "b"), (lm, "a")):
        with dspy.context(lm=model, adapter=adapter):
            assert program(question="q").answer == expected
    assert (lm.answers.used, copied.answers.used) == (1, 2)


# -- program state and optimization ------------------------------------------------------------


def test_dump_and_load_program_state(bridge: Bridge) -> None:
    dummy(bridge, [], follow_examples=True)
    bridge.ok("create_program", signature="question -> answer", demos=TRAINSET)
    dumped = bridge.ok("dump_program_state", program_id="prog_1")
    assert dumped["program_id"] == "prog_1"
    state = dumped["state"]
    assert [demo["answer"] for demo in state["demos"]] == ["Poseidonia", "blue", "4"]
    bridge.ok("create_program", signature="question -> answer")
    assert bridge.ok("load_program_state", program_id="prog_2", state=state) == {
        "program_id": "prog_2",
        "demos": 3,
    }
    result = bridge.ok("execute_program", program_id="prog_2", inputs={"question": ATLANTIS})
    assert result["outputs"] == {"answer": "Poseidonia"}
    # A state may also be given at creation.
    created = bridge.ok("create_program", signature="question -> answer", state=state)
    assert bridge.ok("get_program_info", program_id=created["program_id"])["demos"] == 3


def test_loaded_state_cannot_give_a_program_its_own_lm(bridge: Bridge) -> None:
    bridge.ok("create_program", signature="question -> answer")
    state = bridge.ok("dump_program_state", program_id="prog_1")["state"]
    state["lm"] = {"model": "openai/gpt-4o-mini", "api_base": "http://example.invalid"}
    bridge.ok("load_program_state", program_id="prog_1", state=state)
    assert bridge.state().programs["prog_1"].module.lm is None


@pytest.mark.parametrize(
    "signature, program_type, state, fragment",
    [
        ("question -> answer", "predict", [], "state must be an object from dump_program_state"),
        ("a, b -> c", "predict", "ONE", "the state comes from a different signature"),
        ("question -> answer", "chain_of_thought", "ONE", "state['predict'] is missing"),
        ("question -> answer", "predict", "COT", "has unknown key(s) 'predict'"),
        ("question -> answer", "predict", {"demos": 5}, "state.demos must be a list of objects"),
        ("question -> answer", "predict", {"demos": []}, "state.signature has no fields"),
    ],
)
def test_load_state_that_does_not_fit(
    bridge: Bridge, signature: str, program_type: str, state: Any, fragment: str
) -> None:
    bridge.ok("create_program", signature="question -> answer", program_id="one")
    bridge.ok(
        "create_program", signature="question -> answer", program_id="cot", type="chain_of_thought"
    )
    if state == "ONE":
        state = bridge.ok("dump_program_state", program_id="one")["state"]
    elif state == "COT":
        state = bridge.ok("dump_program_state", program_id="cot")["state"]
    bridge.ok("create_program", signature=signature, program_id="target", type=program_type)
    kind, message = bridge.fail("load_program_state", program_id="target", state=state)
    assert kind == "InvalidState"
    assert fragment in message
    assert bridge.ok("get_program_info", program_id="target")["demos"] == 0


def test_optimize_with_labeled_few_shot_changes_behaviour_and_journals_the_state(
    bridge: Bridge,
) -> None:
    dummy(bridge, [{"answer": "no idea"}] * 5, follow_examples=True)
    bridge.ok("create_program", signature="question -> answer")
    before = bridge.ok("execute_program", program_id="prog_1", inputs={"question": ATLANTIS})
    assert before["outputs"] == {"answer": "no idea"}

    reply = bridge.reply(
        "optimize_program",
        program_id="prog_1",
        trainset=TRAINSET,
        optimizer="labeled_few_shot",
        k=2,
    )
    assert reply["success"] is True, reply
    result = reply["result"]
    assert result["program_id"] == "prog_1" and result["optimizer"] == "labeled_few_shot"
    assert result["demos"] == 2 and len(result["state"]["demos"]) == 2
    assert reply["journal"] == {
        "command": "load_program_state",
        "args": {"program_id": "prog_1", "state": result["state"]},
    }
    assert bridge.ok("get_program_info", program_id="prog_1")["demos"] == 2

    demo = result["state"]["demos"][0]
    after = bridge.ok("execute_program", program_id="prog_1", inputs={"question": demo["question"]})
    assert after["outputs"] == {"answer": demo["answer"]}


def test_replaying_the_journal_reproduces_the_optimized_program() -> None:
    lm_args = {"provider": "dummy", "answers": [{"answer": "no idea"}] * 3, "follow_examples": True}
    original = Bridge()
    original.ok("configure_lm", **lm_args)
    original.ok("create_program", signature="question -> answer", type="chain_of_thought")
    trainset = [{"question": ATLANTIS, "reasoning": "Atlantis was Poseidon's.", "answer": "P."}]
    reply = original.reply(
        "optimize_program", program_id="prog_1", trainset=trainset, optimizer="labeled_few_shot"
    )
    journal = reply["journal"]
    question = {"question": ATLANTIS}
    expected = original.ok("execute_program", program_id="prog_1", inputs=question)
    assert expected["outputs"] == {"answer": "P."}
    assert expected["reasoning"] == "Atlantis was Poseidon's."

    rebuilt = Bridge()
    rebuilt.ok("configure_lm", **lm_args)
    rebuilt.ok("create_program", signature="question -> answer", type="chain_of_thought")
    assert journal["command"] == "load_program_state"
    rebuilt.ok(journal["command"], **journal["args"])
    assert rebuilt.ok("execute_program", program_id="prog_1", inputs=question) == expected
    assert rebuilt.ok("dump_program_state", program_id="prog_1")["state"] == (
        original.ok("dump_program_state", program_id="prog_1")["state"]
    )


def test_optimize_with_bootstrap_few_shot(bridge: Bridge) -> None:
    # The teacher answers two of the three training questions right.
    bridge.ok(
        "configure_lm",
        provider="dummy",
        answers={
            ATLANTIS: {"answer": "poseidonia"},
            "What colour is the sky?": {"answer": "BLUE"},
            "What is 2 + 2?": {"answer": "5"},
        },
    )
    bridge.ok("create_program", signature="question -> answer")
    reply = bridge.reply(
        "optimize_program",
        program_id="prog_1",
        trainset=TRAINSET,
        metric="exact_match",
        max_bootstrapped_demos=4,
        max_labeled_demos=0,
    )
    assert reply["success"] is True, reply
    result = reply["result"]
    assert result["optimizer"] == "bootstrap_few_shot" and result["demos"] == 2
    demos = result["state"]["demos"]
    assert [(d["question"], d["answer"]) for d in demos] == [
        (ATLANTIS, "poseidonia"),
        ("What colour is the sky?", "BLUE"),
    ]
    assert all(d["augmented"] is True for d in demos)
    assert reply["journal"]["args"] == {"program_id": "prog_1", "state": result["state"]}

    # An LM that can only repeat demos now answers from the bootstrapped ones.
    dummy(bridge, [], follow_examples=True)
    after = bridge.ok("execute_program", program_id="prog_1", inputs={"question": ATLANTIS})
    assert after["outputs"] == {"answer": "poseidonia"}
    bridge.ok("create_program", signature="question -> answer")
    kind, _ = bridge.fail("execute_program", program_id="prog_2", inputs={"question": ATLANTIS})
    assert kind == "AdapterParseError", "the unoptimized program has nothing to follow"


@pytest.mark.parametrize("metric, demos", [("exact_match", 0), ("contains", 2)])
def test_metrics(bridge: Bridge, metric: str, demos: int) -> None:
    bridge.ok(
        "configure_lm",
        provider="dummy",
        answers={
            ATLANTIS: {"answer": "It is Poseidonia."},
            "What colour is the sky?": {"answer": "Mostly  BLUE"},
            "What is 2 + 2?": {"answer": "five"},
        },
    )
    bridge.ok("create_program", signature="question -> answer")
    result = bridge.ok(
        "optimize_program",
        program_id="prog_1",
        trainset=TRAINSET,
        metric=metric,
        max_labeled_demos=0,
    )
    assert result["demos"] == demos


def test_optimize_errors(bridge: Bridge) -> None:
    bridge.ok("create_program", signature="question -> answer")
    kind, message = bridge.fail(
        "optimize_program", program_id="prog_1", trainset=TRAINSET, metric="f1"
    )
    assert (kind, message) == (
        "UnknownMetric",
        "unknown metric 'f1'; allowed: exact_match, contains",
    )
    kind, message = bridge.fail(
        "optimize_program", program_id="prog_1", trainset=TRAINSET, optimizer="mipro"
    )
    assert kind == "InvalidArgument"
    assert "unknown optimizer 'mipro'; allowed: bootstrap_few_shot, labeled_few_shot" in message
    kind, message = bridge.fail("optimize_program", program_id="prog_1", trainset=TRAINSET, k=2)
    assert kind == "InvalidArgument"
    assert "'k' do not apply to optimizer 'bootstrap_few_shot'" in message
    kind, message = bridge.fail(
        "optimize_program",
        program_id="prog_1",
        trainset=TRAINSET,
        optimizer="labeled_few_shot",
        max_labeled_demos=1,
    )
    assert kind == "InvalidArgument" and "do not apply to optimizer 'labeled_few_shot'" in message
    kind, message = bridge.fail("optimize_program", program_id="prog_1", trainset=[])
    assert (kind, message) == ("InvalidArgument", "optimize_program: args.trainset is empty")
    kind, message = bridge.fail("optimize_program", program_id="prog_1")
    assert kind == "InvalidArgument" and "args.trainset must be a list" in message
    kind, message = bridge.fail(
        "optimize_program", program_id="prog_1", trainset=[{"question": "q"}]
    )
    assert kind == "InvalidArgument" and "args.trainset[0] lacks field(s) 'answer'" in message
    kind, message = bridge.fail("optimize_program", program_id="prog_1", trainset=TRAINSET)
    assert kind == "LMNotConfigured", "bootstrapping runs the program"
    # Labeled demos need no LM.
    result = bridge.ok(
        "optimize_program", program_id="prog_1", trainset=TRAINSET, optimizer="labeled_few_shot"
    )
    assert result["demos"] == 3


def test_dspy_history_is_not_kept_for_sessions(bridge: Bridge) -> None:
    from dspy.clients.base_lm import GLOBAL_HISTORY

    before = len(GLOBAL_HISTORY)
    dummy(bridge, [{"answer": "a"}])
    bridge.ok("create_program", signature="question -> answer")
    bridge.ok("execute_program", program_id="prog_1", inputs={"question": "q"})
    assert len(GLOBAL_HISTORY) == before
    assert bridge.state().lm.history == []


def test_optimizer_draws_no_progress_bar(bridge: Bridge, capfd: pytest.CaptureFixture[str]) -> None:
    import dspy.teleprompt.bootstrap as bootstrap

    original = bootstrap.tqdm
    bridge.ok("configure_lm", provider="dummy", answers={ATLANTIS: {"answer": "Poseidonia"}})
    bridge.ok("create_program", signature="question -> answer")
    result = bridge.ok("optimize_program", program_id="prog_1", trainset=TRAINSET[:1])
    assert result["demos"] == 1
    assert "it/s" not in capfd.readouterr().err
    assert bootstrap.tqdm is original
