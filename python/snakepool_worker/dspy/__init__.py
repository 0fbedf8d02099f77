"""DSPy commands: per-session language models and programs.

Imported by default when DSPy is installed (see ``snakepool_worker.runtime``). Importing
this package is cheap: ``dspy`` itself is imported on the first DSPy command, or at
start-up with ``--preload dspy``, or at import when ``SNAKEPOOL_PROGRAMS`` names served
programs (below). LiteLLM is never imported here; DSPy imports it only if a model needs
it, on that model's first call.

Every command works on the state of one session and needs a session call
(``args.session_id``, set by the host); without one it fails with ``SessionRequired``.
The one exception is ``execute_program`` of a served program, a plain call. Sessions are
isolated: each has its own language model and programs, and programs run under
``dspy.context(lm=<the session's LM>, ...)``; nothing here calls ``dspy.configure``.

Concurrency: ``execute_program`` is an async generator command (the manifest flags it
``"concurrent": true, "streams": true``). It runs the program with DSPy's ``acall``, as a
task on the worker's event loop, so one worker overlaps many LM calls, and a cancel from
the host stops it; with ``stream`` it sends the program's string outputs as chunks while
the LM writes them. A run without ``stream`` of a session's program with the scripted
(dummy) LM does no I/O, so it is served at once instead, without a task, like a
synchronous command. The other commands are synchronous and have the worker to
themselves. Each run's settings (its LM, adapter, response cache, usage tracker and
trace) live in DSPy's context variable, which every task (and ``asyncio.to_thread``) has
a copy of: runs that overlap never see each other's LM, cache, usage or trace, and
DSPy's history is off.

The package: ``commands`` (the command table, program commands), ``configure``
(``configure_lm``), ``optimize`` (``optimize_program``), ``policy`` (profiles and client
settings from the environment), ``caches`` (response caches), ``failures`` (what a failed
LM call reports), ``signatures``, ``programs``, ``state`` (a session's LM and programs,
and running a program), ``served`` (served programs), ``dummy`` (the scripted test LM),
``loader`` (the lazy DSPy import), ``streaming`` (``execute_program`` with ``stream``),
``snapshot`` (session snapshots), ``schemas`` (the commands' argument schemas) and
``errors``. Argument checks are the runtime's (``snakepool_worker.arguments``); each
command's manifest entry carries the JSON Schema of its arguments (``schemas``).

LM policy (read from the worker's environment, which the host sets):

``SNAKEPOOL_LM_PROFILES``
    A JSON object of named LM profiles defined by the operator: ``{"NAME": {"model":
    str, "api_base"?: str, "api_key_env"?: str, "temperature"?: number, "max_tokens"?:
    int, "num_retries"?: int (default 2), "cache"?: bool (default false)}}``. Names are
    1-128 letters, digits, ``_``, ``.`` or ``-``, other than ``.`` and ``..``. Parsed
    and checked on first use (again only if the value changes); a malformed value makes
    every profile use fail with ``LMProfileInvalid`` naming the profile and key, and the
    worker keeps serving.
    A profile without ``api_key_env`` leaves the key to DSPy, which reads the provider's
    usual variable (``OPENAI_API_KEY`` ...).
``SNAKEPOOL_LM_CLIENT_SETTINGS``
    ``allow`` lets clients give ``model``, ``api_base``, ``api_key_env`` and
    ``num_retries`` themselves. Unset or anything else: denied (the default), and
    clients pick a profile by name. Allow it only for trusted clients: with it a client
    chooses where the worker sends requests, with any key of the worker's environment.
``SNAKEPOOL_LM_CACHE_DIR``
    Where profiles with ``cache: true`` keep their disk cache, one subdirectory per
    profile (``<dir>/<profile>``). Unset: those profiles cache in memory only.
``SNAKEPOOL_PROGRAMS``
    Served programs, set by the host from ``snakepool serve --program NAME=PATH``:
    ``{"NAME": {"path": "/abs/file.json", "profile": "PROFILE"}}`` (names as profile
    names; ``path`` absolute). Each file holds what ``dump_program_state`` returns,
    ``{program_id?, type?="predict", signature, state?}`` with ``signature`` as
    ``create_program`` takes it (and ``instructions`` beside a string signature), or the
    JSON DSPy's ``program.save(path)`` writes as ``state`` in such an object: DSPy's
    file alone names neither fields nor types and is refused, with a message saying how
    to wrap it. The files are loaded once per process, at import when the variable is
    set (so the zygote loads them once for every worker it forks; loading starts no
    thread), else on first use. Loading never stops the worker: a bad entry or file is
    logged, and each call to that program fails with ``ServedProgramInvalid`` naming it
    and its file. A served program runs with its entry's profile, resolved through the
    LM policy on first use (``LMProfileNotFound`` naming the program and its file when
    the profile is not defined); its LM is built once per process and shared by the
    programs of that profile. Served programs are read-only: callers can only run them,
    and a run leaves nothing in them (no history, its own trace; inputs named like
    DSPy's options are refused), so no call can change what the next one sees.

Whatever the policy, an ``api_key_env`` (a client's or a profile's) naming a variable that
starts with ``SNAKEPOOL_`` is refused (``LMSettingsForbidden``): the pool's own settings
and secrets are never sent as an LM key. A client's LM never caches responses.

Response caches: DSPy's own cache is process-wide, keyed without the endpoint or the key,
and kept on disk under ``~/.dspy_cache`` (or ``$DSPY_CACHEDIR``), built on the first read
of ``dspy.cache``; every cached LM call reads and writes whatever ``dspy.cache`` is. Here,
once DSPy is loaded, ``dspy.cache`` is ``NO_STORE``, installed once and put back if
something replaces it: it stores nothing itself, and passes the reads and writes of a
program run to that run's LM's own cache, which the run names in its ``dspy.context``
(the task-local settings above): the profile's cache (memory, at most
``PROFILE_CACHE_ENTRIES`` entries, plus disk under ``SNAKEPOOL_LM_CACHE_DIR``), shared only
by the sessions and served programs that use that profile on this worker, or none. Outside
program runs it stores nothing (or uses a cache something configured before DSPy was
loaded here). So no answer crosses from one profile, endpoint or client LM to another,
even between runs that overlap, and no worker writes to the home directory.

Session snapshots (see ``snapshot``) cover every command: the part
``snakepool_worker.dspy`` of a session is its LM settings as ``configure_lm`` accepted
them (never a key; a dummy LM with how far its script has got), its programs as
``dump_program_state`` gives them and its program-id counter, so the host may replace a
long journal by one snapshot.

Commands (``*`` = ``mutates_session``, journaled by the host):

``configure_lm``\\* ``{profile, temperature?, max_tokens?}`` or ``{provider: "dummy",
answers?, follow_examples?}`` or, when client settings are allowed, ``{model, api_base?,
api_key_env?, temperature?, max_tokens?, num_retries?=2, cache?=false}``
    Creates the session's LM (replacing any previous one). With a profile, the client
    may set ``temperature`` and ``max_tokens`` only (``max_tokens`` at most the
    profile's, when it sets one); the result is ``{provider: "litellm", profile, model,
    temperature, max_tokens, num_retries, cache}`` and never shows the profile's
    ``api_base`` or ``api_key_env``. Replaying the call (a rebuilt session) resolves the
    profile again. The direct form returns ``{provider: "litellm", model, api_base,
    api_key_env, temperature, max_tokens, num_retries, cache: false}``; ``cache: true``
    is refused. ``provider`` is ``"litellm"`` for ``dspy.LM`` models (DSPy picks the
    client: its own HTTP client for OpenAI-compatible endpoints, LiteLLM for the rest)
    and ``"dummy"`` for ``dspy.utils.dummies.DummyLM`` (also selected by ``model:
    "dummy"``; always allowed: it makes no network call).
    ``api_key_env`` names an environment variable of the worker holding the key; the
    key never travels over the wire and is never returned. ``num_retries`` retries
    transient provider errors (429, 5xx, network) with DSPy's back-off of 1 s, 2 s,
    4 s ... or the provider's ``Retry-After``; keep the host's request timeout above
    that. A dummy LM's ``answers`` are a list of ``{output field: value}`` objects, one
    consumed per LM call (the JSON-adapter retry is off for it, so a reply that does
    not fit fails at once), or an object mapping prompt text to such an answer. With
    ``follow_examples`` it answers from a demo whose input matches the call, and when
    none matches, from ``answers`` (DSPy's own DummyLM would fail the call instead). A
    call after the list is used up fails with ``DummyAnswersExhausted`` (DSPy's DummyLM
    would answer "No more responses").
``create_program``\\* ``{signature, type?="predict", instructions?, demos?, state?,
program_id?}``
    ``signature`` is ``"question -> answer"`` / ``"question: str -> answer: int"`` or
    ``{instructions?, inputs: [{name, type?, desc?}], outputs: [...]}``; types are
    ``str, int, float, bool, list[str], dict``. Field names are identifiers and not
    one of ``RESERVED_FIELD_NAMES`` (``config``, ``demos``, ``lm``, ``new_signature``,
    ``prediction``, ``signature``, ``_trace``: DSPy takes inputs of those names as call
    options), which fails with ``ReservedFieldName``. ``type`` is ``predict`` or
    ``chain_of_thought``; ``instructions`` goes with a string signature. ``demos`` are
    objects holding every input and output field; ``state`` comes from
    ``dump_program_state`` (it cannot rename fields: they always come from the
    signature). Ids default to ``prog_1``, ``prog_2`` ... from a per-session counter
    (skipping ids taken explicitly), so replaying the same calls yields the same ids.
    The DSPex spellings ``id`` and ``program_type`` are accepted. Returns
    ``{program_id, type, signature: {instructions, inputs: [{name, type, desc}],
    outputs}}``.
``execute_program`` ``{program_id, inputs, stream?=false}``, or as a plain call ``{program,
inputs, stream?=false}``
    Runs the session's program ``program_id`` with the session's LM, or the served
    program ``program`` (see ``SNAKEPOOL_PROGRAMS``) with its profile's LM; concurrent,
    so runs overlap. Returns ``{outputs, reasoning, usage}``: outputs typed as declared,
    ``reasoning`` for chain of thought (else null), ``usage`` (this call's alone) as
    ``{model: {prompt_tokens, ...}}`` or null. Inputs under reserved names fail with
    ``ReservedFieldName`` before DSPy sees them. ``program`` in a session call fails with
    ``InvalidArgument`` (a session runs its own programs, by ``program_id``); an unknown
    ``program`` fails with ``ProgramNotFound`` listing the served programs.
    ``stream`` (true or false, else ``InvalidArgument``): with ``true`` the program runs
    through ``dspy.streamify`` and the call sends a chunk ``{field, predictor, text}`` for
    each piece of a string output field (and of ``reasoning``, for chain of thought) as
    the LM writes it, before the same result. ``predictor`` is DSPy's name for the
    predictor writing the field (``self`` for ``predict``, ``predict`` for chain of
    thought); a field's texts, joined in order, are its value (its last one may be
    empty). An answer from the response cache sends no chunk; failures are the same as
    without ``stream``. Without ``stream`` no chunk is sent.
``optimize_program``\\* ``{program_id, trainset, metric?="exact_match",
optimizer?="bootstrap_few_shot", max_bootstrapped_demos?=4, max_labeled_demos?=16, k?=16}``
    Compiles the program with ``dspy.BootstrapFewShot`` (needs an LM) or
    ``dspy.LabeledFewShot`` (``k``) and replaces it. Returns ``{program_id, optimizer,
    demos, state}`` and has the host journal ``load_program_state`` with that state
    instead of this call, so a rebuilt session gets the same program without re-running
    the optimizer. The program's previous demos are replaced. Metrics compare every
    declared output field, case- and whitespace-insensitively: ``exact_match`` (equal)
    or ``contains`` (expected text within the predicted text). A trainset example holds
    every input and output field (and may hold ``reasoning`` for chain of thought).
``dump_program_state`` ``{program_id}`` -> ``{program_id, type, signature, state}``
    ``signature`` as ``create_program`` returns it: the reply, saved to a file, is a
    program ``SNAKEPOOL_PROGRAMS`` can serve.
``load_program_state``\\* ``{program_id, state}`` -> ``{program_id, demos}``
``list_programs`` ``{}`` -> ``{programs: [{program_id, type, signature: "q -> a"}]}``
``get_program_info`` ``{program_id}`` -> ``{program_id, type, signature, demos,
instructions}``
``delete_program``\\* ``{program_id}`` -> ``{deleted}``
``reset_state``\\* ``{}`` -> ``{programs_deleted, lm_cleared}``

Every command rejects arguments it does not know (``InvalidArgument``), so a misspelt
setting fails instead of being ignored.

Error types (the exception class names below): ``SessionRequired``, ``InvalidArgument``,
``InvalidSignature``, ``ReservedFieldName`` (an ``InvalidSignature``), ``UnsupportedType``,
``ProgramNotFound``, ``MissingInput``, ``UnknownInput``, ``LMNotConfigured``,
``ApiKeyMissing``, ``LMSettingsForbidden`` (the LM policy refuses the settings),
``LMProfileNotFound`` (the message lists the profiles), ``LMProfileInvalid``,
``LMCallFailed``, ``UnknownMetric``, ``InvalidState``, ``DummyAnswersExhausted``,
``ServedProgramInvalid`` (a served program's entry or file is not usable).

``LMCallFailed`` is what a failure at the provider or on the way to it becomes (an HTTP
error, an unreachable endpoint, a reply that is not JSON), e.g. ``LM call failed (profile
'x', model 'openai/m'): HTTP 404 from the provider (InvalidRequestError)``: the provider's
message and body, which could hold anything the endpoint returns, and the endpoint's
address stay out of the reply and its traceback; the worker logs them on stderr for the
operator. Other failures inside DSPy keep DSPy's type names (for example
``AdapterParseError`` when the LM's reply does not fit the signature).
"""

from __future__ import annotations

from ..registry import default_registry
from .caches import NO_STORE, PROFILE_CACHE_ENTRIES
from .commands import COMMAND_NAMES, COMMANDS, register_commands, register_session_hooks
from .configure import PROVIDERS
from .errors import (
    ApiKeyMissing,
    DSPyBridgeError,
    DummyAnswersExhausted,
    InvalidArgument,
    InvalidSignature,
    InvalidState,
    LMCallFailed,
    LMNotConfigured,
    LMProfileInvalid,
    LMProfileNotFound,
    LMSettingsForbidden,
    MissingInput,
    ProgramNotFound,
    ReservedFieldName,
    ServedProgramInvalid,
    SessionRequired,
    UnknownInput,
    UnknownMetric,
    UnsupportedType,
)
from .loader import load_dspy
from .optimize import METRICS, OPTIMIZERS
from .policy import (
    CACHE_DIR_ENV,
    CLIENT_SETTINGS_ENV,
    DEFAULT_NUM_RETRIES,
    PROFILES_ENV,
    LMProfile,
    client_settings_allowed,
    lm_profiles,
    parse_profiles,
)
from .programs import PROGRAM_TYPES, Program
from .served import PROGRAMS_ENV, load_if_configured
from .signatures import ALLOWED_TYPES, RESERVED_FIELD_NAMES, FieldSpec
from .snapshot import SNAPSHOT_PART, restore_session_state, snapshot_session_state
from .state import STATE_KEY, SessionState, cleanup_session_state

__all__ = [
    "ALLOWED_TYPES",
    "ApiKeyMissing",
    "CACHE_DIR_ENV",
    "CLIENT_SETTINGS_ENV",
    "COMMANDS",
    "COMMAND_NAMES",
    "DEFAULT_NUM_RETRIES",
    "DSPyBridgeError",
    "DummyAnswersExhausted",
    "FieldSpec",
    "InvalidArgument",
    "InvalidSignature",
    "InvalidState",
    "LMCallFailed",
    "LMNotConfigured",
    "LMProfile",
    "LMProfileInvalid",
    "LMProfileNotFound",
    "LMSettingsForbidden",
    "METRICS",
    "MissingInput",
    "NO_STORE",
    "OPTIMIZERS",
    "PROFILES_ENV",
    "PROFILE_CACHE_ENTRIES",
    "PROGRAMS_ENV",
    "PROGRAM_TYPES",
    "PROVIDERS",
    "Program",
    "ProgramNotFound",
    "RESERVED_FIELD_NAMES",
    "ReservedFieldName",
    "SNAPSHOT_PART",
    "STATE_KEY",
    "ServedProgramInvalid",
    "SessionRequired",
    "SessionState",
    "UnknownInput",
    "UnknownMetric",
    "UnsupportedType",
    "cleanup_session_state",
    "client_settings_allowed",
    "load_dspy",
    "lm_profiles",
    "parse_profiles",
    "register_commands",
    "register_session_hooks",
    "restore_session_state",
    "snapshot_session_state",
]

register_commands(default_registry)
load_if_configured()
