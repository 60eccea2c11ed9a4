"""The call's task supervisor: crashes told at once, a close that never raises."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from app.tasks import Supervisor, wait_event


async def _crash() -> None:
    await asyncio.sleep(0)
    raise KeyError("bug")


async def test_a_crash_is_logged_when_it_happens_and_its_policy_runs() -> None:
    tasks = Supervisor()
    crashes: list[BaseException] = []
    with capture_logs() as logs:
        tasks.spawn(_crash(), "pump-CA1", crashes.append)
        await asyncio.sleep(0.01)  # nobody awaits the task
    (entry,) = [e for e in logs if e["event"] == "call.task_crashed"]
    assert entry["task"] == "pump-CA1" and entry["log_level"] == "error"
    assert isinstance(entry["exc_info"], KeyError) and entry["exc_info"].__traceback__
    assert crashes == [entry["exc_info"]]
    assert len(tasks) == 0


async def test_close_cancels_everything_and_never_raises() -> None:
    tasks = Supervisor()
    forever = tasks.spawn(asyncio.sleep(3600), "playback-CA1")
    tasks.spawn(_crash(), "bargein-CA1")
    await asyncio.sleep(0.01)
    await tasks.close()
    assert forever.cancelled() and len(tasks) == 0
    late = tasks.spawn(asyncio.sleep(3600), "tool-CA1")  # a spawn after the call ended
    await asyncio.sleep(0)
    assert late.cancelled()


async def test_settle_lets_tasks_finish_without_cancelling_them() -> None:
    tasks = Supervisor()
    written: list[str] = []

    async def write() -> None:
        await asyncio.sleep(0.01)
        written.append("record")

    tasks.spawn(write(), "bus-write")
    assert await tasks.settle(1.0)
    assert written == ["record"] and len(tasks) == 0
    forever = tasks.spawn(asyncio.sleep(3600), "bus-listen")
    assert not await tasks.settle(0.01)  # still running: not cancelled by settle
    assert not forever.done()
    await tasks.close()
    assert forever.cancelled()


async def test_a_task_spawned_while_closing_is_cancelled_too() -> None:
    tasks = Supervisor()
    spawned: list[asyncio.Task[None]] = []

    async def spawns_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            spawned.append(tasks.spawn(asyncio.sleep(3600), "end-CA1"))

    tasks.spawn(spawns_on_cancel(), "pump-CA1")
    await asyncio.sleep(0)
    await tasks.close()
    assert spawned and spawned[0].cancelled() and len(tasks) == 0


async def test_a_wait_on_an_event_never_loses_a_cancellation() -> None:
    event = asyncio.Event()

    async def loop_forever() -> None:  # like playback's pacing loop
        while True:
            event.clear()
            await wait_event(event, 10.0)

    task = asyncio.create_task(loop_forever())
    await asyncio.sleep(0)
    event.set()  # the event fires in the very moment the call ends
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert task in done and task.cancelled()


async def test_a_wait_on_an_event_times_out() -> None:
    assert await wait_event(asyncio.Event(), 0.01) is False
