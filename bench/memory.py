"""Per-call memory over a long stretch of agent speech: BargeIn now and as it was.

One call's barge-in policy (with the real Silero batcher) hears the agent talk for
`--minutes` while the caller is silent, on a virtual clock (no waiting): Playback's
reports of agent audio (60 ms chunks, 250 ms ahead) and the caller's 20 ms frames, as a
call feeds them. Memory is what tracemalloc finds still allocated after each minute, over
what was allocated before the agent began. The same run drives the BargeIn of an older
revision (`--before`, loaded from git), so the two figures come from one run.

    .venv/bin/python -m bench.memory [--minutes 10] [--before d6e21e5^]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import inspect
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

from app.call import bargein as current
from app.config import Settings
from app.vad.batcher import VadBatcher
from app.vad.silero import get_vad
from bench.common import FIXTURES, ROOT

CHUNK_S = 0.06  # Playback's chunk
LEAD_S = 0.25  # Playback's lead at Twilio
FRAME_S = 0.02


class _Floor:
    agent_playing = True
    local_turns = False

    async def pause_agent(self) -> None: ...

    def resume_agent(self) -> None: ...

    async def interrupt(self, reason: str) -> bool:
        return True

    async def end_of_turn(self) -> None: ...

    async def send_held(self, payload: str) -> None: ...


def _load_revision(rev: str) -> ModuleType | None:
    """app/call/bargein.py as it was at `rev`, as a module of its own."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:app/call/bargein.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"(no 'before' figures: cannot read {rev}: {exc})", file=sys.stderr)
        return None
    path = Path(tempfile.mkdtemp()) / "bargein_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("bargein_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _measure(module: ModuleType, batcher: VadBatcher, minutes: int) -> list[float]:
    """KB still allocated after each minute of agent speech."""
    now = [0.0]
    bargein = module.BargeIn(Settings(_env_file=None), batcher, _Floor(), clock=lambda: now[0])
    push = bargein.push
    if next(iter(inspect.signature(push).parameters)) == "frame":  # takes a MulawFrame
        from app.audio.frame import MulawFrame  # only in newer trees

        def push(payload: str, _push: Any = bargein.push) -> None:
            _push(MulawFrame(payload))

    agent = base64.b64encode((FIXTURES / "book_cleaning.ulaw").read_bytes()).decode()
    chunk_chars = round(CHUNK_S * 8000) // 3 * 4
    chunks = [agent[i : i + chunk_chars] for i in range(0, len(agent), chunk_chars)]
    silence = base64.b64encode(b"\xff" * 160).decode()
    task = asyncio.create_task(bargein.run())
    figures: list[float] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        frames_per_chunk = round(CHUNK_S / FRAME_S)
        n = 0
        for minute in range(1, minutes + 1):
            while now[0] < minute * 60.0:
                bargein.agent_audio(chunks[n % len(chunks)], now[0] + LEAD_S)
                for _ in range(frames_per_chunk):
                    push(silence)
                    # let the VAD thread score it, so no backlog builds up that a call's
                    # real-time pace would not build
                    await asyncio.sleep(0.0003)
                    now[0] += FRAME_S
                n += 1
            await asyncio.sleep(0.05)
            figures.append((tracemalloc.get_traced_memory()[0] - before) / 1024.0)
    finally:
        tracemalloc.stop()
        task.cancel()
    return figures


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--before", default="d6e21e5^", help="git revision to compare with")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    batcher = VadBatcher(get_vad(ROOT / "silero_vad.onnx"))
    runs: list[tuple[str, ModuleType]] = [("now", current)]
    if (before := _load_revision(args.before)) is not None:
        runs.insert(0, (f"before ({args.before})", before))
    print(f"BargeIn memory per call, agent talking, caller silent, {args.minutes} min:")
    print(f"{'':>20} " + " ".join(f"{m:>7d}m" for m in range(1, args.minutes + 1)) + "  (KB)")
    try:
        for name, module in runs:
            figures = await _measure(module, batcher, args.minutes)
            print(f"{name:>20} " + " ".join(f"{kb:8.0f}" for kb in figures))
    finally:
        await batcher.close()


if __name__ == "__main__":
    asyncio.run(main())
