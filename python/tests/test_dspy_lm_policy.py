"""The LM policy of the DSPy commands: operator profiles, client settings, errors, caches.

In-process through ``Runtime.handle_frame``; real LM calls go to an OpenAI-compatible
fake server on 127.0.0.1 (``fake_lm_server``).
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any, Dict, Iterator

import pytest

dspy = pytest.importorskip("dspy")

from bridge_for_tests import Bridge  # noqa: E402
from conftest import LMEnv  # noqa: E402
from fake_lm_server import FakeLMServer  # noqa: E402

from snakepool_worker import dspy as bridge_module  # noqa: E402

PROFILE_KEY = "sk-profile-key-0123"
POOL_SECRET = "sp-pool-secret-4567"
MARKER = "INTERNAL-BODY-MARKER-89ab"
QUESTION = {"question": "What is the capital of Atlantis?"}


@pytest.fixture
def server() -> Iterator[FakeLMServer]:
    fake = FakeLMServer()
    yield fake
    fake.close()


@pytest.fixture
def env(lm_env: LMEnv) -> LMEnv:
    """No policy variables; a profile key in SP_TEST_PROFILE_KEY and a pool secret set."""
    lm_env.set("SP_TEST_PROFILE_KEY", PROFILE_KEY)
    lm_env.set("SNAKEPOOL_TOKEN", POOL_SECRET)
    return lm_env


@pytest.fixture
def bridge(env: LMEnv) -> Bridge:
    return Bridge()


def profile(server: FakeLMServer, prefix: str, **extra: Any) -> Dict[str, Any]:
    """A profile for the fake server's endpoint ``prefix``, keyed by SP_TEST_PROFILE_KEY."""
    settings: Dict[str, Any] = {
        "model": "openai/test-model",
        "api_base": server.base(prefix),
        "api_key_env": "SP_TEST_PROFILE_KEY",
        "num_retries": 0,
    }
    settings.update(extra)
    return settings


def program(bridge: Bridge, session: str = "s1") -> str:
    program_id: str = bridge.ok("create_program", session, signature="question -> answer")[
        "program_id"
    ]
    return program_id


def ask(bridge: Bridge, program_id: str, session: str = "s1") -> Any:
    return bridge.ok("execute_program", session, program_id=program_id, inputs=QUESTION)


# -- profiles ----------------------------------------------------------------------------------


def test_a_profile_is_resolved_and_its_endpoint_and_key_stay_private(
    bridge: Bridge, env: LMEnv, server: FakeLMServer
) -> None:
    env.profiles(
        {
            "fast": profile(server, "a", temperature=0.2, max_tokens=100),
            "other-4o.mini_2": {"model": "openai/other"},
        }
    )
    raw = bridge.raw("configure_lm", profile="fast")
    for secret in (server.base("a"), "127.0.0.1", "SP_TEST_PROFILE_KEY", PROFILE_KEY):
        assert secret.encode() not in raw, secret
    assert json.loads(raw)["result"] == {
        "provider": "litellm",
        "profile": "fast",
        "model": "openai/test-model",
        "temperature": 0.2,
        "max_tokens": 100,
        "num_retries": 0,
        "cache": False,
    }
    lm = bridge.state().lm
    assert lm.kwargs["api_base"] == server.base("a")
    assert lm.kwargs["api_key"] == PROFILE_KEY
    assert lm.cache is False and lm.num_retries == 0

    # A client may set temperature and max_tokens (up to the profile's limit) only.
    result = bridge.ok("configure_lm", profile="fast", temperature=0.9, max_tokens=50)
    assert (result["temperature"], result["max_tokens"]) == (0.9, 50)
    assert bridge.state().lm.kwargs["max_tokens"] == 50
    kind, message = bridge.fail("configure_lm", profile="fast", max_tokens=101)
    assert kind == "LMSettingsForbidden"
    assert "max_tokens 101 is above the limit of profile 'fast' (100)" in message
    for fixed in ("model", "api_base", "api_key_env", "num_retries", "cache"):
        kind, message = bridge.fail("configure_lm", profile="fast", **{fixed: "x"})
        assert kind == "LMSettingsForbidden", fixed
        assert "a client may set only temperature and max_tokens" in message
    # A profile without the settings uses DSPy's defaults; the client's override applies.
    assert bridge.ok("configure_lm", profile="other-4o.mini_2", max_tokens=7)["max_tokens"] == 7


def test_a_profile_call_reaches_its_endpoint_with_its_key(
    bridge: Bridge, env: LMEnv, server: FakeLMServer
) -> None:
    server.answer("a", answer="Poseidonia")
    env.profiles({"fast": profile(server, "a")})
    bridge.ok("configure_lm", profile="fast")
    result = ask(bridge, program(bridge))
    assert result["outputs"] == {"answer": "Poseidonia"}
    requests = server.wait_for(1)
    assert [request.path for request in requests] == ["/a/v1/chat/completions"]
    assert requests[0].authorization == f"Bearer {PROFILE_KEY}"
    for request in requests:
        assert POOL_SECRET not in json.dumps(request.headers)
        assert POOL_SECRET.encode() not in request.body


def test_replaying_a_profile_configuration_resolves_the_profile_again(
    env: LMEnv, server: FakeLMServer
) -> None:
    env.profiles({"fast": profile(server, "a")})
    first = Bridge()
    reply = first.reply("configure_lm", profile="fast", temperature=0.5)
    assert "journal" not in reply, "the request itself is journaled"
    second = Bridge()
    assert second.ok("configure_lm", profile="fast", temperature=0.5) == reply["result"]


def test_unknown_profile_lists_the_known_ones(bridge: Bridge, env: LMEnv) -> None:
    env.profiles({"fast": {"model": "openai/a"}, "smart": {"model": "openai/b"}})
    kind, message = bridge.fail("configure_lm", profile="slow")
    assert kind == "LMProfileNotFound"
    assert message == "configure_lm: no LM profile 'slow'; profiles: fast, smart"
    env.profiles({})
    kind, message = bridge.fail("configure_lm", profile="slow")
    assert kind == "LMProfileNotFound" and "none defined" in message
    assert "SNAKEPOOL_LM_PROFILES" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "SNAKEPOOL_LM_PROFILES is not valid JSON"),
        ("[1]", "SNAKEPOOL_LM_PROFILES must be a JSON object"),
        ('{"p": 5}', "profile 'p' must be an object"),
        ('{"p": {}}', "profile 'p': 'model' is required"),
        ('{"p": {"model": ""}}', "profile 'p': 'model' must be a non-empty string"),
        ('{"p": {"model": "m", "api_base": 5}}', "profile 'p': 'api_base' must be a non-empty"),
        ('{"p": {"model": "m", "api_base": "localhost:1/v1"}}', "must be an http:// or https://"),
        ('{"p": {"model": "m", "api_key_env": "a b"}}', "'api_key_env' must be an environment"),
        ('{"p": {"model": "m", "temperature": "hot"}}', "'temperature' must be a number >= 0"),
        ('{"p": {"model": "m", "max_tokens": 0}}', "'max_tokens' must be an integer >= 1"),
        ('{"p": {"model": "m", "num_retries": true}}', "'num_retries' must be an integer >= 0"),
        ('{"p": {"model": "m", "cache": "yes"}}', "profile 'p': 'cache' must be true or false"),
        ('{"p": {"model": "m", "api_key": "sk-x"}}', "profile 'p' has unknown key(s) 'api_key'"),
        ('{"../x": {"model": "m"}}', "profile name '../x' is not usable"),
        ('{"..": {"model": "m"}}', "profile name '..' is not usable"),
        ('{"a b": {"model": "m"}}', "profile name 'a b' is not usable"),
    ],
)
def test_malformed_profiles_fail_configure_lm_clearly(
    bridge: Bridge, env: LMEnv, text: str, fragment: str
) -> None:
    env.profiles(text)
    kind, message = bridge.fail("configure_lm", profile="p")
    assert kind == "LMProfileInvalid"
    assert fragment in message
    # The worker keeps serving, and a dummy LM needs no profile.
    assert bridge.ok("configure_lm", provider="dummy", answers=[])["provider"] == "dummy"
    kind, message = bridge.fail("configure_lm", model="openai/x")
    assert kind == "LMSettingsForbidden" and "SNAKEPOOL_LM_PROFILES is malformed" in message


# -- client settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "deny", "yes", "1", "allowed"])
def test_direct_settings_are_forbidden_unless_allowed(
    bridge: Bridge, env: LMEnv, value: Any
) -> None:
    if value is not None:
        env.client_settings(value)
    env.profiles({"fast": {"model": "openai/a"}, "smart": {"model": "openai/b"}})
    for args in (
        {"model": "openai/gpt-4o-mini"},
        {"model": "openai/m", "api_base": "http://169.254.169.254/latest/v1"},
        {"provider": "litellm", "model": "openai/m", "api_key_env": "OPENAI_API_KEY"},
    ):
        kind, message = bridge.fail("configure_lm", **args)
        assert kind == "LMSettingsForbidden", args
        assert "use a profile" in message and "one of: fast, smart" in message
        assert "SNAKEPOOL_LM_CLIENT_SETTINGS=allow" in message
    assert bridge.state().lm is None


@pytest.mark.parametrize("value", ["allow", " ALLOW "])
def test_direct_settings_work_when_allowed(
    bridge: Bridge, env: LMEnv, server: FakeLMServer, value: str
) -> None:
    env.client_settings(value)
    server.answer("c", answer="direct")
    result = bridge.ok(
        "configure_lm",
        model="openai/test-model",
        api_base=server.base("c"),
        api_key_env="SP_TEST_PROFILE_KEY",
        num_retries=0,
    )
    assert result["api_base"] == server.base("c") and result["cache"] is False
    assert ask(bridge, program(bridge))["outputs"] == {"answer": "direct"}
    assert server.wait_for(1)[0].authorization == f"Bearer {PROFILE_KEY}"
    # A client's LM never caches: its answers must not reach anyone else.
    kind, message = bridge.fail("configure_lm", model="openai/test-model", cache=True)
    assert kind == "LMSettingsForbidden" and "never uses the response cache" in message


def test_a_client_endpoint_without_a_key_variable_gets_no_key_of_the_operator(
    bridge: Bridge, env: LMEnv, server: FakeLMServer
) -> None:
    env.client_settings("allow")
    env.set("OPENAI_API_KEY", "sk-operator-secret")
    server.answer("c", answer="direct")
    bridge.ok("configure_lm", model="openai/test-model", api_base=server.base("c"), num_retries=0)
    assert ask(bridge, program(bridge))["outputs"] == {"answer": "direct"}
    seen = server.wait_for(1)[0].authorization
    assert "sk-operator-secret" not in (seen or ""), seen


@pytest.mark.parametrize("policy", ["deny", "allow"])
@pytest.mark.parametrize("variable", ["SNAKEPOOL_TOKEN", "snakepool_token", "SNAKEPOOL_LM_KEY"])
def test_pool_variables_are_never_used_as_api_keys(
    bridge: Bridge, env: LMEnv, server: FakeLMServer, policy: str, variable: str
) -> None:
    env.client_settings(policy)
    env.set(variable, POOL_SECRET)
    server.answer("a", answer="never")
    env.profiles({"leaky": profile(server, "a", api_key_env=variable)})
    kind, message = bridge.fail("configure_lm", profile="leaky")
    assert kind == "LMSettingsForbidden"
    assert "profile 'leaky' names an API key variable starting with 'SNAKEPOOL_'" in message
    assert variable not in message
    kind, message = bridge.fail(
        "configure_lm", model="openai/test-model", api_base=server.base("a"), api_key_env=variable
    )
    assert kind == "LMSettingsForbidden"
    if policy == "allow":
        assert "args.api_key_env names an API key variable starting with" in message
    assert bridge.state().lm is None
    assert server.count() == 0


def test_a_profile_key_that_is_not_set_is_reported_without_naming_it(
    bridge: Bridge, env: LMEnv, server: FakeLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    env.profiles({"fast": profile(server, "a", api_key_env="SP_TEST_UNSET_KEY")})
    with caplog.at_level(logging.WARNING, logger="snakepool_worker.dspy"):
        kind, message = bridge.fail("configure_lm", profile="fast")
    assert kind == "ApiKeyMissing"
    assert "profile 'fast': its API key variable is not set" in message
    assert "SP_TEST_UNSET_KEY" not in message
    assert "SP_TEST_UNSET_KEY" in caplog.text, "the operator learns the name from the log"


# -- upstream errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, summary",
    [
        (404, "HTTP 404 from the provider"),
        (401, "HTTP 401 from the provider"),
        (500, "HTTP 500 from the provider"),
        (None, "the provider's reply (HTTP 200) could not be used"),
    ],
)
def test_provider_errors_reach_the_client_without_the_body(
    bridge: Bridge,
    env: LMEnv,
    server: FakeLMServer,
    caplog: pytest.LogCaptureFixture,
    status: Any,
    summary: str,
) -> None:
    if status is None:
        server.garbage("a", f"<html>{MARKER}</html>")
    else:
        server.fail("a", status, f"secret internal page {MARKER}")
    env.profiles({"fast": profile(server, "a")})
    bridge.ok("configure_lm", profile="fast")
    program_id = program(bridge)
    with caplog.at_level(logging.ERROR, logger="snakepool_worker.dspy"):
        error = bridge.error("execute_program", program_id=program_id, inputs=QUESTION)
    assert error["type"] == "LMCallFailed"
    assert error["message"].startswith(
        f"LM call failed (profile 'fast', model 'openai/test-model'): {summary} ("
    )
    text = json.dumps(error)
    for secret in (MARKER, server.base("a"), f":{server.port}", PROFILE_KEY):
        assert secret not in text, secret
    assert "The above exception was the direct cause" not in error["traceback"]
    assert "During handling of the above exception" not in error["traceback"]
    assert server.count("a") >= 1
    # The operator sees the provider's answer in the worker's log.
    assert MARKER in caplog.text


def test_an_optimizer_run_against_a_failing_provider_leaks_nothing(
    bridge: Bridge, env: LMEnv, server: FakeLMServer
) -> None:
    server.fail("a", 500, f"secret internal page {MARKER}")
    env.profiles({"fast": profile(server, "a")})
    bridge.ok("configure_lm", profile="fast")
    trainset = [{**QUESTION, "answer": "Poseidonia"}] * 12
    reply = bridge.raw("optimize_program", program_id=program(bridge), trainset=trainset)
    assert MARKER.encode() not in reply and server.base("a").encode() not in reply
    answer = json.loads(reply)
    # BootstrapFewShot gives up after DSPy's max_errors failures and re-raises the last.
    assert answer["success"] is False, answer
    assert answer["error"]["type"] == "LMCallFailed"
    assert server.count("a") >= 1


def test_an_unreachable_provider_is_reported_briefly(bridge: Bridge, env: LMEnv) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    env.profiles(
        {
            "down": {
                "model": "openai/m",
                "api_base": base,
                "api_key_env": "SP_TEST_PROFILE_KEY",
                "num_retries": 0,
            }
        }
    )
    bridge.ok("configure_lm", profile="down")
    error = bridge.error("execute_program", program_id=program(bridge), inputs=QUESTION)
    assert error["type"] == "LMCallFailed"
    assert error["message"].startswith(
        "LM call failed (profile 'down', model 'openai/m'): the provider could not be reached ("
    )
    assert str(port) not in json.dumps(error)


def test_adapter_parse_errors_are_kept(bridge: Bridge, env: LMEnv, server: FakeLMServer) -> None:
    server.answer("a", wrong_field="x")
    env.profiles({"fast": profile(server, "a")})
    bridge.ok("configure_lm", profile="fast")
    kind, message = bridge.fail("execute_program", program_id=program(bridge), inputs=QUESTION)
    assert kind == "AdapterParseError" and "answer" in message


# -- response caches -----------------------------------------------------------------------------


def test_each_cached_profile_has_its_own_cache(
    bridge: Bridge, env: LMEnv, server: FakeLMServer
) -> None:
    server.answer("a", answer="from-a")
    server.answer("b", answer="from-b")
    server.answer("c", answer="from-c")
    env.profiles(
        {
            "pa": profile(server, "a", cache=True),
            "pb": profile(server, "b", cache=True),
            "pc": profile(server, "c"),
        }
    )
    before = vars(dspy).get("cache")
    for session, name in (("s1", "pa"), ("s2", "pb"), ("s3", "pc")):
        bridge.ok("configure_lm", session, profile=name)
    answers = {}
    for session, prefix in (("s1", "a"), ("s2", "b"), ("s1", "a"), ("s2", "b"), ("s3", "c")):
        answers.setdefault(prefix, []).append(ask(bridge, program(bridge, session), session))
    # Same model, same prompt, different endpoints: no answer crosses profiles.
    assert [r["outputs"]["answer"] for r in answers["a"]] == ["from-a", "from-a"]
    assert [r["outputs"]["answer"] for r in answers["b"]] == ["from-b", "from-b"]
    assert answers["c"][0]["outputs"] == {"answer": "from-c"}
    # The second call of each cached profile was answered from its cache.
    assert (server.count("a"), server.count("b")) == (1, 1)
    assert bridge.state("s1").response_cache is not bridge.state("s2").response_cache
    # An uncached profile, or a dummy, never reads a cache, even with the same prompt.
    ask(bridge, program(bridge, "s3"), "s3")
    assert server.count("c") == 2
    assert vars(dspy).get("cache") is before, "DSPy's cache is put back after each call"


def test_a_profile_cache_is_shared_by_the_sessions_of_that_profile_only(
    bridge: Bridge, env: LMEnv, server: FakeLMServer
) -> None:
    server.answer("a", answer="from-a")
    env.profiles({"pa": profile(server, "a", cache=True)})
    for session in ("s1", "s2"):
        bridge.ok("configure_lm", session, profile="pa")
        ask(bridge, program(bridge, session), session)
    assert server.count("a") == 1
    assert bridge.state("s1").response_cache is bridge.state("s2").response_cache


def test_a_cache_dir_holds_one_directory_per_profile(
    bridge: Bridge, env: LMEnv, server: FakeLMServer, tmp_path: Any
) -> None:
    server.answer("a", answer="from-a")
    env.cache_dir(tmp_path)
    env.profiles({"pa": profile(server, "a", cache=True), "pb": profile(server, "a")})
    bridge.ok("configure_lm", profile="pa")
    bridge.ok("configure_lm", "s2", profile="pb")
    ask(bridge, program(bridge))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pa"]
    assert any((tmp_path / "pa").iterdir())


def test_dspy_default_cache_stores_nothing_once_the_bridge_loads_dspy(bridge: Bridge) -> None:
    bridge.ok("configure_lm", provider="dummy", answers=[])
    cache = vars(dspy).get("cache")
    assert cache is bridge_module.NO_STORE, "installed before anything reads dspy.cache"
    cache.put({"k": 1}, "v")
    assert cache.get({"k": 1}) is None and {"k": 1} not in cache


# -- reserved field names --------------------------------------------------------------------


def test_reserved_names_cover_the_options_predict_takes_from_its_inputs() -> None:
    import inspect
    import re

    from dspy.predict.predict import Predict

    source = inspect.getsource(Predict._forward_preprocess)
    source += inspect.getsource(Predict._forward_postprocess)
    popped = set(re.findall(r"kwargs\.pop\(\s*[\"'](\w+)[\"']", source))
    # Names tested for membership in the call's keyword arguments themselves.
    popped |= set(re.findall(r"[\"'](\w+)[\"']\s+(?:not\s+)?in\s+kwargs\b(?![\[.])", source))
    assert {"config", "demos", "lm", "signature"} <= popped, "has Predict changed shape?"
    assert popped <= set(bridge_module.RESERVED_FIELD_NAMES), popped


@pytest.mark.parametrize("name", list(bridge_module.RESERVED_FIELD_NAMES))
def test_reserved_names_are_refused_at_create(bridge: Bridge, name: str) -> None:
    reserved = ", ".join(bridge_module.RESERVED_FIELD_NAMES)
    for signature in (
        f"question, {name} -> answer",
        f"question -> {name}",
        {"inputs": [{"name": name}], "outputs": [{"name": "answer"}]},
        {"inputs": [{"name": "question"}], "outputs": [{"name": name, "type": "dict"}]},
    ):
        kind, message = bridge.fail("create_program", signature=signature)
        assert kind == "ReservedFieldName", (signature, message)
        assert f"field name '{name}' is reserved" in message
        assert message.endswith(f"reserved names: {reserved}")
    assert bridge.ok("list_programs") == {"programs": []}


def test_reserved_names_are_refused_at_execute_before_dspy(bridge: Bridge) -> None:
    bridge.ok("configure_lm", provider="dummy", answers=[{"answer": "kept"}])
    program_id = program(bridge)
    for extra in (
        {"config": {"api_base": "http://169.254.169.254"}},
        {"lm": "x"},
        {"demos": []},
        {"prediction": {"type": "content", "content": "/etc/passwd"}},
    ):
        kind, message = bridge.fail(
            "execute_program", program_id=program_id, inputs={**QUESTION, **extra}
        )
        assert kind == "ReservedFieldName"
        assert f"program 'prog_1' inputs: field name '{next(iter(extra))}' is reserved" in message
    # Nothing reached the LM: its one answer is still there.
    assert ask(bridge, program_id)["outputs"] == {"answer": "kept"}


def test_a_state_cannot_set_call_options(bridge: Bridge) -> None:
    program_id = program(bridge)
    state = bridge.ok("dump_program_state", program_id=program_id)["state"]
    state["config"] = {"api_base": "http://169.254.169.254"}
    kind, message = bridge.fail("load_program_state", program_id=program_id, state=state)
    assert kind == "InvalidState" and "unknown key(s) 'config'" in message
