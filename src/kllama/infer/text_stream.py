"""Turning generated token ids into text deltas: incremental detokenisation and stop-string matching.

Both must hold text back: a token can end inside a multi-byte character (decoded as U+FFFD until the next token
arrives), and the tail of the text can be the start of a stop string that is only confirmed by later tokens.
"""
from __future__ import annotations

from typing import Sequence

from transformers import PreTrainedTokenizerBase


class IncrementalDecoder:
    """Decode a growing id sequence into new text per token, re-decoding only a short window of recent tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context (spaces depend on the previous token)
        self._read = 0  # ids before this have been turned into emitted text

    def push(self, token_id: int) -> str:
        """Append one token and return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""


class StopStringMatcher:
    """Accumulate answer text; release only what cannot be the beginning of a stop string; detect a stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything seen so far
        self._released = 0  # chars of `text` already handed out
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; return the part that is now safe to show (the answer ends at a stop string)."""
        if self.stopped:
            return ""
        self.text += delta
        hits = [i for i in (self.text.find(s, max(0, self._released - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self.text = self.text[:end]
            return self._release(end)
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The answer is over (length/eos): release what was held back."""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop string.
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self.text[self._released:upto]
        self._released = upto
        return out
