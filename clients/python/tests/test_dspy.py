"""DSPy in a session, end to end with the scripted (dummy) LM, which every server allows."""

from __future__ import annotations

import pytest
from conftest import unique

import snakepool_client as sp

TRAINSET = [
    {"question": "Capital of France?", "answer": "Paris"},
    {"question": "Capital of Japan?", "answer": "Tokyo"},
]


def test_programs_are_created_run_and_listed(client: sp.Client) -> None:
    with client.session(unique("dspy")) as session:
        dspy = session.dspy
        lm = dspy.configure_lm(
            provider="dummy",
            answers=[{"answer": "Paris"}, {"reasoning": "2 and 2 make 4.", "answer": "4"}],
        )
        assert (lm["provider"], lm["answers"]) == ("dummy", 2)
        predict = dspy.create_program("question -> answer")
        assert dspy.run(predict, question="Capital of France?")["outputs"] == {"answer": "Paris"}
        thought = dspy.create_program(
            "question -> answer: int",
            kind="chain_of_thought",
            instructions="Add the numbers.",
            program_id="adder",
        )
        assert thought == "adder"
        result = dspy.execute(thought, {"question": "2 + 2?"}, timeout=30)
        assert result["outputs"] == {"answer": 4} and result["reasoning"] == "2 and 2 make 4."
        assert [(p["program_id"], p["type"]) for p in dspy.list_programs()] == [
            (predict, "predict"),
            ("adder", "chain_of_thought"),
        ]
        info = dspy.program_info("adder")
        assert (info["instructions"], info["demos"]) == ("Add the numbers.", 0)
        dspy.delete_program(predict)
        assert [p["program_id"] for p in dspy.list_programs()] == ["adder"]
        assert dspy.reset() == {"programs_deleted": 1, "lm_cleared": True}
        assert dspy.list_programs() == []


def test_optimizing_saving_and_loading_a_program(client: sp.Client) -> None:
    with client.session(unique("dspy-state")) as session:
        dspy = session.dspy
        dspy.configure_lm(provider="dummy", answers=[{"answer": "Paris"}, {"answer": "Tokyo"}])
        signature = {
            "instructions": "Answer with a city.",
            "inputs": [{"name": "question", "type": "str", "desc": "a question"}],
            "outputs": [{"name": "answer", "type": "str", "desc": "a city"}],
        }
        program = dspy.create_program(signature)
        bootstrapped = dspy.optimize(
            program, TRAINSET, metric="exact_match", max_bootstrapped_demos=2, max_labeled_demos=2
        )
        assert (bootstrapped["optimizer"], bootstrapped["demos"]) == ("bootstrap_few_shot", 2)
        labeled = dspy.optimize(program, TRAINSET[:1], optimizer="labeled_few_shot", k=1)
        assert labeled["demos"] == 1
        record = dspy.dump_state(program)
        assert (record["program_id"], record["type"]) == (program, "predict")
        assert record["signature"]["instructions"] == "Answer with a city."
        copy = dspy.create_program(record["signature"], kind=record["type"], state=record["state"])
        assert dspy.program_info(copy)["demos"] == 1
        demos = dspy.create_program("question -> answer", demos=TRAINSET)
        assert dspy.program_info(demos)["demos"] == 2
        assert dspy.load_state(demos, record["state"]) == {"program_id": demos, "demos": 1}


def test_a_streamed_run_ends_with_the_result(client: sp.Client) -> None:
    with client.session(unique("dspy-stream")) as session:
        session.dspy.configure_lm(provider="dummy", answers=[{"answer": "Tokyo"}])
        program = session.dspy.create_program("question -> answer")
        with session.dspy.stream(program, {"question": "Capital of Japan?"}) as stream:
            chunks = list(stream)
        assert all(set(chunk) == {"field", "predictor", "text"} for chunk in chunks)
        assert stream.result["outputs"] == {"answer": "Tokyo"}


def test_dspy_failures_are_worker_errors_with_their_type(client: sp.Client) -> None:
    with client.session(unique("dspy-errors")) as session:
        dspy = session.dspy
        program = dspy.create_program("question -> answer")
        cases = [
            (lambda: dspy.run(program, question="?"), "LMNotConfigured"),
            (lambda: dspy.run("missing", question="?"), "ProgramNotFound"),
            (lambda: dspy.run(program, query="?"), "UnknownInput"),
            (lambda: dspy.configure_lm(model="openai/gpt-4o-mini"), "LMSettingsForbidden"),
            (lambda: dspy.configure_lm("no-such-profile"), "LMProfileNotFound"),
            (lambda: dspy.create_program("config -> answer"), "ReservedFieldName"),
        ]
        for action, python_type in cases:
            with pytest.raises(sp.WorkerError) as raised:
                action()
            assert raised.value.python_type == python_type, raised.value.message
        dspy.configure_lm(provider="dummy", answers=[])
        with pytest.raises(sp.WorkerError) as missing:
            dspy.execute(program, {})
        assert missing.value.python_type == "MissingInput"
