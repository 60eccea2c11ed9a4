"""Cut a streamed reply into sentences as they complete.

TTS speaks best a sentence at a time, and the first sentence should reach it while the
model is still writing the rest: that is most of the chained engine's latency.
A boundary is `.`, `!`, `?`, `;` or `:` followed by whitespace (so "3.5" and "10:30"
never split), or a newline. Abbreviations ("Dr.", "e.g.") and a leading list number
("1.") are not boundaries. A run with no boundary is cut at a space once it is long,
so TTS never waits on a runaway sentence.
"""

from __future__ import annotations

__all__ = ["SentenceSplitter"]

_TERMINATORS = frozenset(".!?;:")
_CLOSERS = frozenset("\"')]}\u201d\u2019")
_ABBREVIATIONS = frozenset(
    {
        "mr.", "mrs.", "ms.", "dr.", "prof.", "sr.", "jr.", "st.", "mt.", "vs.",
        "e.g.", "i.e.", "approx.", "inc.", "ltd.", "co.", "corp.",
        "jan.", "feb.", "mar.", "apr.", "jun.", "jul.", "aug.", "sep.", "sept.",
        "oct.", "nov.", "dec.", "a.m.", "p.m.", "u.s.",
    }
)  # fmt: skip


class SentenceSplitter:
    """Feed text deltas with `push`; get back the sentences they completed."""

    def __init__(self, max_chars: int = 250) -> None:
        self._buf = ""
        self._scan = 0
        self._max_chars = max_chars

    def push(self, delta: str) -> list[str]:
        """Add a delta; return every sentence it completed, in order."""
        self._buf += delta
        out: list[str] = []
        while (cut := self._next_boundary()) is not None:
            sentence = self._buf[:cut].strip()
            self._buf = self._buf[cut:].lstrip()
            self._scan = 0
            if sentence:
                out.append(sentence)
        return out

    def flush(self) -> str | None:
        """The text after the last boundary, at the end of the reply."""
        rest = self._buf.strip()
        self._buf = ""
        self._scan = 0
        return rest or None

    def _next_boundary(self) -> int | None:
        buf = self._buf
        i = self._scan
        while i < len(buf):
            ch = buf[i]
            if ch == "\n":
                return i + 1
            if ch in _TERMINATORS:
                end = i + 1
                while end < len(buf) and (buf[end] in _TERMINATORS or buf[end] in _CLOSERS):
                    end += 1
                if end == len(buf):
                    self._scan = i  # the next delta decides
                    return self._overflow()
                if buf[end].isspace() and not self._is_abbreviation(i):
                    return end
                i = end
                continue
            i += 1
        self._scan = i
        return self._overflow()

    def _is_abbreviation(self, dot: int) -> bool:
        """Whether the `.` at `dot` ends an abbreviation, an initial or a list number."""
        if self._buf[dot] != ".":
            return False
        start = dot
        while start > 0 and not self._buf[start - 1].isspace():
            start -= 1
        word = self._buf[start : dot + 1].lower()
        if word in _ABBREVIATIONS:
            return True
        stem = word[:-1]
        if len(stem) == 1 and stem.isalpha():
            return True  # an initial, as in "J. Smith"
        return stem.isdigit() and not self._buf[:start].strip()

    def _overflow(self) -> int | None:
        """Cut an overlong run at its last space."""
        if len(self._buf) <= self._max_chars:
            return None
        space = self._buf.rfind(" ", 0, self._max_chars)
        return space + 1 if space > 0 else self._max_chars
