"""Local call simulator: plays a carrier's part of a call against our service.

It does what the carrier does (Twilio unless told `--carrier`), in its exact message shapes
(app.simwire): signs and POSTs the incoming
call webhook, follows the `<Connect><Stream>` of the TwiML, streams the caller's clip as
20 ms mu-law frames on the event loop's clock (then line silence), sends DTMF, and plays the
agent's audio through a simulated playback buffer that acknowledges marks only once the
audio before them has played and flushes on `clear`. What the caller would have heard is
recorded on the call clock, and the time from the end of each caller turn to the first
agent audio is reported. Anything the carrier would reject is counted as a protocol error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import math
import os
import sys
import wave
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import aiohttp
import numpy as np
import numpy.typing as npt

from app.audio.g711 import ulaw_decode, ulaw_encode
from app.clock import loop_time
from app.modes import Mode
from app.simwire import CarrierSide, Ids, Outbound, SimulatorError, side
from app.telephony.carrier import Carrier

__all__ = [
    "BYTES_PER_MS",
    "FRAME_BYTES",
    "FRAME_MS",
    "LINE_SILENCE",
    "SAMPLE_RATE",
    "CallResult",
    "Clip",
    "Dtmf",
    "SimulatorError",
    "configure_parser",
    "percentile",
    "run",
    "simulate_call",
    "turn_latencies",
]

SAMPLE_RATE = 8000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000  # mu-law: one byte per sample
BYTES_PER_MS = SAMPLE_RATE // 1000
LINE_SILENCE = b"\xff"  # mu-law code for 0
# Unlabelled clips: a frame is speech when it stands 12 dB over the clip's noise floor (its
# 10th-percentile frame level), within -45..-30 dBFS (speech peaks near -15). This matches
# the fixtures' labels to 20 ms on clean clips, and mostly to 40 ms under pink noise at 20 dB
# SNR (a short "yes" fading into the noise ends 180 ms early).
SPEECH_DBFS_RANGE = (-45.0, -30.0)
SPEECH_OVER_NOISE_DB = 12.0
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TAIL_S = 8.0
DTMF_DIGITS = frozenset("0123456789*#")
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True)
class Clip:
    """The caller's side of the call: mu-law audio and where each caller turn ends."""

    ulaw: bytes
    speech_ends_ms: tuple[int, ...]
    name: str = "clip"

    @property
    def duration_ms(self) -> int:
        return len(self.ulaw) // BYTES_PER_MS

    @classmethod
    def from_wav(cls, path: str | Path) -> Clip:
        """Load a PCM16 8 kHz mono WAV; turn ends come from a sibling labels.json if the
        clip is a fixture, else from the last frame loud enough to be speech."""
        path = Path(path)
        try:
            with wave.open(str(path), "rb") as wav:
                rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
                data = wav.readframes(wav.getnframes())
        except (OSError, wave.Error, EOFError) as exc:
            raise SimulatorError(f"{path}: cannot read as WAV: {exc}") from exc
        if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
            raise SimulatorError(
                f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; the simulator "
                "needs 8000 Hz mono 16-bit PCM, as a phone line carries (resample it first, "
                "e.g. `sox in.wav -r 8000 -c 1 -b 16 out.wav`)"
            )
        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
        ends = _labelled_speech_ends(path)
        if ends is None:
            ends = _energy_speech_end(pcm)
        return cls(ulaw=ulaw_encode(pcm), speech_ends_ms=ends, name=path.stem)


def _labelled_speech_ends(path: Path) -> tuple[int, ...] | None:
    labels_path = path.with_name("labels.json")
    if not labels_path.is_file():
        return None
    try:
        labels = json.loads(labels_path.read_text())
        segments = labels[path.stem]["speech_ms"]
        return tuple(int(end) for _start, end in segments)
    except (ValueError, KeyError, TypeError):
        return None


def _energy_speech_end(pcm: npt.NDArray[np.int16]) -> tuple[int, ...]:
    """End of the last 20 ms frame loud enough to be speech; no turn if none is."""
    whole = len(pcm) // FRAME_BYTES * FRAME_BYTES
    if whole == 0:
        return ()
    frames = pcm[:whole].astype(np.float64).reshape(-1, FRAME_BYTES)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    dbfs = 20 * np.log10(np.maximum(rms, 1e-3) / 32768)
    floor = float(np.percentile(dbfs, 10))
    threshold = min(max(floor + SPEECH_OVER_NOISE_DB, SPEECH_DBFS_RANGE[0]), SPEECH_DBFS_RANGE[1])
    loud = np.flatnonzero(dbfs > threshold)
    return (int(loud[-1] + 1) * FRAME_MS,) if len(loud) else ()


@dataclass(frozen=True)
class Dtmf:
    """A key the caller presses `at_s` seconds after the stream starts."""

    digit: str
    at_s: float

    @classmethod
    def parse(cls, text: str) -> Dtmf:
        """`DIGIT@SECONDS`, e.g. `*@2.5` (also the argparse type of --dtmf)."""
        digit, sep, at = text.partition("@")
        try:
            at_s = float(at)
        except ValueError:
            at_s = math.nan
        if not sep or digit not in DTMF_DIGITS or not at_s >= 0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected DIGIT@SECONDS with a digit among 0-9 * #, e.g. 1@2.5"
            )
        return cls(digit, at_s)


@dataclass
class CallResult:
    """What happened on one simulated call, from the carrier's side of the stream."""

    call_sid: str
    stream_sid: str
    account_sid: str
    parameters: dict[str, str]  # the markup's <Parameter>s, sent in the start message
    speech_ends_ms: tuple[int, ...]
    sent_payloads: list[str] = field(default_factory=list)  # base64, one per 20 ms frame
    received_payloads: list[str] = field(default_factory=list)  # base64 as the server sent
    received_at_ms: list[float] = field(default_factory=list)  # call clock, per payload
    played: bytes = b""  # mu-law heard by the caller, aligned to the call clock
    played_bytes: int = 0  # agent audio actually played (not dropped by clear)
    marks_sent_back: list[str] = field(default_factory=list)
    clear_times_ms: list[float] = field(default_factory=list)
    dtmf_sent: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    latencies_ms: list[float | None] = field(default_factory=list)  # per caller turn
    transcript: list[dict[str, str]] = field(default_factory=list)
    ended_by: Literal["caller", "server"] = "caller"

    @property
    def frames_sent(self) -> int:
        return len(self.sent_payloads)

    @property
    def clears(self) -> int:
        return len(self.clear_times_ms)

    @property
    def received_bytes(self) -> bytes:
        return b"".join(base64.b64decode(p) for p in self.received_payloads)

    @property
    def received_ms(self) -> float:
        return len(self.received_bytes) / BYTES_PER_MS

    @property
    def played_ms(self) -> float:
        return self.played_bytes / BYTES_PER_MS


class _Playback:
    """Twilio's outbound buffer: plays queued audio in real time, one frame per tick.

    Positions count bytes ever queued; a mark waits for the position it was queued at to
    be played out, so it is echoed once the audio before it has finished playing.
    """

    def __init__(self, frames: int) -> None:
        self.queue = bytearray()
        self.queued = 0
        self.consumed = 0
        self.marks: deque[tuple[int, str]] = deque()
        self.played = bytearray(LINE_SILENCE * (frames * FRAME_BYTES))
        self.played_bytes = 0

    def add_audio(self, audio: bytes) -> None:
        self.queue += audio
        self.queued += len(audio)

    def add_mark(self, name: str) -> None:
        self.marks.append((self.queued, name))

    def clear(self) -> list[str]:
        """Drop everything queued; every pending mark is acknowledged at once."""
        self.consumed += len(self.queue)
        self.queue.clear()
        names = [name for _pos, name in self.marks]
        self.marks.clear()
        return names

    def tick(self, frame: int) -> list[str]:
        """Start playing frame `frame`; returns marks whose audio finished before it."""
        done = []
        while self.marks and self.marks[0][0] <= self.consumed:
            done.append(self.marks.popleft()[1])
        chunk = bytes(self.queue[:FRAME_BYTES])
        del self.queue[:FRAME_BYTES]
        start = frame * FRAME_BYTES
        self.played[start : start + len(chunk)] = chunk
        self.consumed += len(chunk)
        self.played_bytes += len(chunk)
        return done


class _Call:
    """One call's media stream: the clock loop that sends and plays, and the receiver."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        carrier: CarrierSide,
        result: CallResult,
        clip: Clip,
        dtmf: Sequence[Dtmf],
        tail_s: float,
    ) -> None:
        self.ws = ws
        self.carrier = carrier
        self.ids = Ids(result.call_sid, result.stream_sid, result.account_sid)
        self.result = result
        self.dtmf = deque(sorted(dtmf, key=lambda d: d.at_s))
        caller = clip.ulaw + LINE_SILENCE * (-len(clip.ulaw) % FRAME_BYTES)
        self.frames = [caller[i : i + FRAME_BYTES] for i in range(0, len(caller), FRAME_BYTES)]
        self.frames += [LINE_SILENCE * FRAME_BYTES] * round(tail_s * 1000 / FRAME_MS)
        self.playback = _Playback(len(self.frames))
        self.ticks = 0  # frames of the call clock that have run
        self.send_lock = asyncio.Lock()
        self.t0 = 0.0

    def now_ms(self) -> float:
        return (loop_time() - self.t0) * 1000

    async def send(self, message: dict[str, Any]) -> None:
        """Send a message of the carrier's (numbered by its side, as the carrier does)."""
        async with self.send_lock:
            await self.ws.send_str(json.dumps(message))

    async def run(self, before_stop: Callable[[], Awaitable[None]]) -> None:
        r = self.result
        connected = self.carrier.connected()
        if connected is not None:
            await self.send(connected)
        self.t0 = loop_time()
        await self.send(self.carrier.start(self.ids, r.parameters))
        receiver = asyncio.create_task(self.receive())
        try:
            if await self.clock() and not self.ws.closed:
                await before_stop()
                stop = self.carrier.stop(self.ids)
                if stop is not None:
                    await self.send(stop)
            else:
                r.ended_by = "server"
        except ConnectionError:
            r.ended_by = "server"
        finally:
            await self.ws.close()
            await receiver
        r.played = bytes(self.playback.played[: self.ticks * FRAME_BYTES])
        r.played_bytes = self.playback.played_bytes

    async def clock(self) -> bool:
        """Send a frame every 20 ms on the loop's clock (real time in production) and play
        one; False if the server ended the stream first."""
        for n, frame in enumerate(self.frames):
            await asyncio.sleep(max(0.0, self.t0 + n * FRAME_MS / 1000 - loop_time()))
            if self.ws.closed:
                return False
            payload = base64.b64encode(frame).decode("ascii")
            await self.send(self.carrier.media(self.ids, n + 1, n * FRAME_MS, payload))
            self.result.sent_payloads.append(payload)
            while self.dtmf and self.dtmf[0].at_s * 1000 <= n * FRAME_MS:
                digit = self.dtmf.popleft().digit
                await self.send(self.carrier.dtmf(self.ids, digit))
                self.result.dtmf_sent.append(digit)
            await self.echo_marks(self.playback.tick(n))
            self.ticks = n + 1
        return True

    async def echo_marks(self, names: list[str]) -> None:
        for name in names:
            await self.send(self.carrier.mark(self.ids, name))
            self.result.marks_sent_back.append(name)

    async def receive(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    await self.on_message(msg.data)
                except ConnectionError:
                    return
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.result.protocol_errors.append(f"binary frame of {len(msg.data)} bytes")
            else:
                return

    async def on_message(self, raw: str) -> None:
        errors = self.result.protocol_errors
        try:
            message = json.loads(raw)
        except ValueError:
            errors.append(f"not JSON: {raw[:80]!r}")
            return
        if not isinstance(message, dict):
            errors.append(f"not a JSON object: {raw[:80]!r}")
            return
        event = message.get("event")
        rejected = self.carrier.inbound(self.ids, message)
        if rejected is not None:
            errors.append(f"{rejected}: {raw[:80]!r}")
            return
        kind, value = self.carrier.outbound(message)
        if kind is Outbound.MEDIA:
            audio = _b64(value) if isinstance(value, str) else None
            if not isinstance(value, str) or not audio:
                errors.append(f"{event} without a base64 payload: {raw[:80]!r}")
                return
            self.result.received_payloads.append(value)
            self.result.received_at_ms.append(self.now_ms())
            self.playback.add_audio(audio)
        elif kind is Outbound.MARK:
            if not isinstance(value, str) or not value:
                errors.append(f"{event} without a name: {raw[:80]!r}")
                return
            self.playback.add_mark(value)
        else:
            self.result.clear_times_ms.append(self.now_ms())
            cleared = self.playback.clear()
            if self.carrier.echoes_cleared_marks:
                await self.echo_marks(cleared)
            ack = self.carrier.cleared(self.ids)
            if ack is not None:
                await self.send(ack)


def _b64(payload: str) -> bytes | None:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None


def turn_latencies(ends_ms: Sequence[int], received_at_ms: Sequence[float]) -> list[float | None]:
    """For each caller turn end, ms until the first agent audio received after it."""
    latencies: list[float | None] = []
    for end in ends_ms:
        after = [t for t in received_at_ms if t >= end]
        latencies.append(round(min(after) - end, 1) if after else None)
    return latencies


async def _fetch_transcript(
    http: aiohttp.ClientSession, url: str, call_sid: str, admin_token: str
) -> list[dict[str, str]]:
    """The call's transcript from the admin API; empty when it has none to give."""
    try:
        async with http.get(
            f"{url}/admin/calls/{call_sid}",
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=aiohttp.ClientTimeout(total=3),
        ) as resp:
            if resp.status != 200:
                return []
            record = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    items = record.get("transcript") if isinstance(record, dict) else None
    if not isinstance(items, list):
        return []
    return [
        {"role": str(i.get("role", "")), "text": str(i.get("text", ""))}
        for i in items
        if isinstance(i, dict)
    ]


async def simulate_call(
    clip: Clip | str | Path,
    *,
    url: str = DEFAULT_URL,
    persona: str | None = None,
    mode: str | None = None,
    dtmf: Sequence[Dtmf] = (),
    tail_s: float = DEFAULT_TAIL_S,
    auth_token: str | None = None,
    admin_token: str | None = None,
    account_sid: str | None = None,
    from_number: str = "+15005550006",
    to_number: str = "+15005550001",
    carrier: Carrier = Carrier.TWILIO,
    answered_by: str | None = None,
) -> CallResult:
    """Place one call against the service at `url`, as `carrier` would, and report on it.

    With `auth_token` (the carrier's signing key: Twilio's or Plivo's auth token, Telnyx's
    Ed25519 private key in base64, SignalWire's signing key) the webhook, and the upgrade
    where the carrier signs it, carry its signature; with `admin_token` the transcript is
    fetched from the admin API before hanging up. `answered_by` plays an outbound call's
    machine detection (Twilio's `AnsweredBy`, e.g. `human`, `machine_end_beep`).
    """
    if not isinstance(clip, Clip):
        clip = Clip.from_wav(clip)
    part = side(carrier, auth_token)
    url = url.rstrip("/")
    query = urlencode({k: v for k, v in (("persona", persona), ("mode", mode)) if v})
    webhook = f"{url}{part.webhook_path}" + (f"?{query}" if query else "")
    ids = part.ids(account_sid)
    result = CallResult(
        call_sid=ids.call,
        stream_sid=ids.stream,
        account_sid=ids.account,
        parameters={},
        speech_ends_ms=clip.speech_ends_ms,
    )
    extra = {"AnsweredBy": answered_by} if answered_by else {}
    body, headers = part.webhook(webhook, ids, from_number, to_number, extra)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        try:
            async with http.post(webhook, data=body, headers=headers) as resp:
                markup = await resp.text()
                if resp.status != 200:
                    raise SimulatorError(f"webhook answered {resp.status}: {markup[:200]!r}")
        except aiohttp.ClientError as exc:
            raise SimulatorError(f"webhook {webhook} failed: {exc}") from exc
        stream_url, result.parameters = part.stream(markup)
        try:
            ws = await http.ws_connect(
                stream_url, headers=part.upgrade_headers(stream_url), autoping=True
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise SimulatorError(f"stream {stream_url} refused: {exc.status}") from exc
        except aiohttp.ClientError as exc:
            raise SimulatorError(f"stream {stream_url} failed: {exc}") from exc

        async def before_stop() -> None:
            if admin_token:
                result.transcript = await _fetch_transcript(http, url, result.call_sid, admin_token)

        await _Call(ws, part, result, clip, dtmf, tail_s).run(before_stop)
    result.latencies_ms = turn_latencies(clip.speech_ends_ms, result.received_at_ms)
    return result


def write_played_wav(path: str | Path, played: bytes) -> None:
    """What the caller heard, as a PCM16 8 kHz mono WAV."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(ulaw_decode(played).astype("<i2").tobytes())


def format_summary(result: CallResult) -> str:
    """A human summary of one call."""
    r = result
    lines = [
        f"call {r.call_sid} stream {r.stream_sid} (ended by {r.ended_by})",
        f"  sent: {r.frames_sent} frames ({r.frames_sent * FRAME_MS} ms)"
        + (f", dtmf {''.join(r.dtmf_sent)}" if r.dtmf_sent else ""),
        f"  agent audio: {r.received_ms:.0f} ms received, {r.played_ms:.0f} ms played",
        f"  marks acked: {len(r.marks_sent_back)}; clears: {r.clears}"
        + (f" at {', '.join(f'{t:.0f}' for t in r.clear_times_ms)} ms" if r.clears else ""),
        f"  protocol errors: {len(r.protocol_errors)}",
    ]
    lines += [f"    {error}" for error in r.protocol_errors]
    for turn, (end, latency) in enumerate(zip(r.speech_ends_ms, r.latencies_ms, strict=True), 1):
        heard = (
            f"first agent audio after {latency:.0f} ms"
            if latency is not None
            else ("no agent audio after it")
        )
        lines.append(f"  turn {turn}: caller speech ended at {end} ms, {heard}")
    if r.transcript:
        lines.append("  transcript:")
        lines += [f"    {item['role']}: {item['text']}" for item in r.transcript]
    return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's arguments to `parser` (the `call` subcommand)."""
    parser.add_argument("clip", type=Path, help="caller audio: PCM16 8 kHz mono WAV")
    parser.add_argument("--url", default=DEFAULT_URL, help="service base URL")
    parser.add_argument("--persona", help="persona to ask for (webhook query)")
    parser.add_argument("--mode", choices=tuple(Mode), type=Mode, help="engine to ask for")
    parser.add_argument(
        "--carrier",
        choices=tuple(Carrier),
        type=Carrier,
        default=Carrier.TWILIO,
        help="whose part to play (webhook, signature, stream messages)",
    )
    parser.add_argument("--out", type=Path, help="write what the caller heard to this WAV")
    parser.add_argument("--calls", type=int, default=1, help="concurrent calls (load test)")
    parser.add_argument(
        "--dtmf",
        type=Dtmf.parse,
        action="append",
        default=[],
        metavar="DIGIT@SECONDS",
        help="press a key at this time after the stream starts (repeatable)",
    )
    parser.add_argument(
        "--tail",
        type=float,
        default=DEFAULT_TAIL_S,
        metavar="SECONDS",
        help="how long to keep listening after the clip",
    )


# The environment variable holding each carrier's signing key, as the simulator signs.
_SIGNING_KEYS = {
    Carrier.TWILIO: "TWILIO_AUTH_TOKEN",
    Carrier.TELNYX: "TELNYX_PRIVATE_KEY",  # the seed whose public half is TELNYX_PUBLIC_KEY
    Carrier.PLIVO: "PLIVO_AUTH_TOKEN",
    Carrier.SIGNALWIRE: "SIGNALWIRE_SIGNING_KEY",
}


def _out_path(out: Path, index: int, calls: int) -> Path:
    return out if calls == 1 else out.with_name(f"{out.stem}-{index}{out.suffix}")


async def _run(args: argparse.Namespace, clip: Clip) -> int:
    calls = await asyncio.gather(
        *(
            simulate_call(
                clip,
                url=args.url,
                persona=args.persona,
                mode=args.mode,
                dtmf=args.dtmf,
                tail_s=args.tail,
                auth_token=os.environ.get(_SIGNING_KEYS[args.carrier]) or None,
                admin_token=os.environ.get("ADMIN_TOKEN") or None,
                account_sid=os.environ.get("TWILIO_ACCOUNT_SID") or None,
                carrier=args.carrier,
            )
            for _ in range(args.calls)
        ),
        return_exceptions=True,
    )
    failed = 0
    first_latencies: list[float] = []
    for index, outcome in enumerate(calls, 1):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, SimulatorError | OSError | aiohttp.ClientError):
                raise outcome
            failed += 1
            print(f"call {index} failed: {outcome}", file=sys.stderr)
            continue
        print(format_summary(outcome))
        failed += bool(outcome.protocol_errors)
        answered = [t for t in outcome.latencies_ms if t is not None]
        first_latencies += answered[:1]
        if args.out is not None:
            path = _out_path(args.out, index, args.calls)
            write_played_wav(path, outcome.played)
            print(f"  heard audio written to {path}")
    if args.calls > 1:
        summary = f"{args.calls} calls, {failed} failed or with protocol errors"
        if first_latencies:
            summary += (
                f"; first agent audio after the caller's turn: p50 "
                f"{percentile(first_latencies, 50):.0f} ms, p95 "
                f"{percentile(first_latencies, 95):.0f} ms ({len(first_latencies)} calls)"
            )
        print(summary)
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """Run the simulator from parsed arguments; the exit code (0: every call was clean)."""
    if args.calls < 1:
        print("--calls must be at least 1", file=sys.stderr)
        return 2
    try:
        clip = Clip.from_wav(args.clip)
    except SimulatorError as exc:
        print(exc, file=sys.stderr)
        return 2
    return asyncio.run(_run(args, clip))


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m app.simulator", description=__doc__)
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
