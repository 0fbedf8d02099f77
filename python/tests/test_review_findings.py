"""Findings of a review of the LM policy, each a failing test until it is fixed."""

from __future__ import annotations

from typing import Iterator

import pytest

pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import LMEnv  # noqa: E402
from fake_lm_server import FakeLMServer  # noqa: E402

OPERATOR_KEY = "sk-operator-openai-key-1234"


@pytest.fixture
def server() -> Iterator[FakeLMServer]:
    fake = FakeLMServer()
    yield fake
    fake.close()


def test_a_profile_endpoint_without_a_key_variable_gets_the_operators_provider_key(
    lm_env: LMEnv, server: FakeLMServer
) -> None:
    """A profile with ``api_base`` and no ``api_key_env`` (the README's ``[lm.local]``)
    lets litellm fall back to ``OPENAI_API_KEY``: the operator's OpenAI key goes to
    whatever server the profile's endpoint is. Client settings guard against exactly
    this (``NO_KEY``); profiles do not."""
    lm_env.set("OPENAI_API_KEY", OPERATOR_KEY)
    lm_env.profiles(
        {"local": {"model": "openai/llama", "api_base": server.base("l"), "num_retries": 0}}
    )
    server.answer("l", answer="local")
    bridge = Bridge()
    bridge.ok("configure_lm", profile="local")
    program_id = bridge.ok("create_program", signature="question -> answer")["program_id"]
    bridge.ok("execute_program", program_id=program_id, inputs={"question": "q?"})
    seen = server.wait_for(1)[0].authorization
    assert OPERATOR_KEY not in (seen or ""), f"the profile's endpoint received {seen!r}"
