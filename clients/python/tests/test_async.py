"""The asyncio client: the same calls, sessions, streams, cancels and DSPy helpers, awaited."""

from __future__ import annotations

import asyncio

import pytest
from conftest import CALL_TIMEOUT, WAIT, Server, run_async, unique, wait_until_async

import snakepool_client as sp


def test_calls_and_sessions(server: Server) -> None:
    async def calls() -> None:
        async with sp.AsyncClient(server.url, timeout=CALL_TIMEOUT) as client:
            assert (await client.health())["status"] == "ready"
            assert await client.call("echo", {"x": 1}) == {"x": 1}
            naps = [client.call("nap", {"seconds": 0.2, "tag": str(n)}) for n in range(6)]
            assert len(await asyncio.gather(*naps)) == 6
            session_id = unique("async")
            async with client.session(session_id) as session:
                assert await session.call("note", {"value": "a"}) == ["a"]
                assert session.state == "created"
                assert await session.call("notes") == ["a"]
                assert session.state == "resumed"
                assert (await session.info())["journal_entries"] == 1
            again = client.session(session_id)
            assert await again.call("notes") == [] and again.state == "created"
            assert await again.close() is True
            assert await again.close() is False

    run_async(calls())


def test_typed_errors(server: Server) -> None:
    async def calls() -> None:
        async with sp.AsyncClient(server.url, timeout=CALL_TIMEOUT) as client:
            with pytest.raises(sp.UnknownCommandError):
                await client.call("no_such_command")
            with pytest.raises(sp.WorkerError) as raised:
                await client.call("fail", {"message": "async boom"})
            assert raised.value.python_type == "ValueError"
            with pytest.raises(sp.RequestTimeoutError):
                await client.call("nap", {"seconds": 30}, timeout=1)
            with pytest.raises(sp.CallNotFoundError):
                await client.cancel(sp.new_request_id())

    run_async(calls())


def test_streams(server: Server) -> None:
    async def calls() -> None:
        async with sp.AsyncClient(server.url, timeout=CALL_TIMEOUT) as client:
            stream = await client.stream("count", {"n": 4})
            assert [chunk async for chunk in stream] == [{"n": n} for n in range(4)]
            assert stream.result["total"] == 4
            async with client.session(unique("async-tally")) as session:
                tally = await session.stream("tally", {"add": 2})
                assert [chunk async for chunk in tally] == [0] and tally.result == 2
                assert session.state == "created"
            failing = await client.stream("count", {"n": 3, "fail_at": 1})
            with pytest.raises(sp.WorkerError):
                async for _ in failing:
                    pass
            with pytest.raises(sp.ForbiddenError):
                await client.stream("shutdown")

    run_async(calls())


def test_cancelling(server: Server) -> None:
    async def calls() -> None:
        async with sp.AsyncClient(server.url, timeout=CALL_TIMEOUT) as client:
            async with await client.stream("count", {"n": 10000, "delay": 0.01}) as stream:
                assert await stream.__anext__() == {"n": 0}
                await stream.cancel()
                with pytest.raises(sp.CallCancelledError):
                    async for _ in stream:
                        pass

            rid = sp.new_request_id()
            call = asyncio.ensure_future(client.call("nap", {"seconds": 60}, request_id=rid))

            async def cancelled() -> bool:
                try:
                    await client.cancel(rid)
                except sp.CallNotFoundError:
                    return False
                return True

            await wait_until_async(f"call {rid} to be in flight", cancelled)
            with pytest.raises(sp.CallCancelledError) as raised:
                await asyncio.wait_for(call, WAIT)
            assert (raised.value.status, raised.value.request_id) == (499, rid)

    run_async(calls())


def test_dspy(server: Server) -> None:
    async def calls() -> None:
        async with sp.AsyncClient(server.url, timeout=CALL_TIMEOUT) as client:
            async with client.session(unique("async-dspy")) as session:
                dspy = session.dspy
                await dspy.configure_lm(provider="dummy", answers=[{"answer": "Paris"}] * 3)
                program = await dspy.create_program("question -> answer", program_id="qa")
                result = await dspy.run(program, question="Capital of France?")
                assert result["outputs"] == {"answer": "Paris"}
                result = await dspy.execute(program, {"question": "And again?"})
                assert result["outputs"] == {"answer": "Paris"}
                stream = await dspy.stream(program, {"question": "Once more?"})
                chunks = [chunk async for chunk in stream]
                assert all(chunk["field"] == "answer" for chunk in chunks)
                assert stream.result["outputs"] == {"answer": "Paris"}
                optimized = await dspy.optimize(
                    program, [{"question": "q", "answer": "a"}], optimizer="labeled_few_shot"
                )
                assert optimized["demos"] == 1
                record = await dspy.dump_state(program)
                assert (await dspy.load_state(program, record["state"]))["demos"] == 1
                assert (await dspy.program_info(program))["demos"] == 1
                assert [p["program_id"] for p in await dspy.list_programs()] == ["qa"]
                await dspy.delete_program(program)
                assert (await dspy.reset()) == {"programs_deleted": 0, "lm_cleared": True}

    run_async(calls())
