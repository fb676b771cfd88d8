"""Incremental detokenization with stop strings, for streaming answers.

Pure logic: feed token ids, get the text that is safe to show now. Text that might
still become a stop string, or an incomplete UTF-8 character, is held back.

Each step decodes only a short window of recent tokens (the way text-generation
servers do), so a long answer costs the same per token as a short one.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._longest_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # the answer so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._prefix = 0  # token window: ids[_prefix:_read] were decoded into text already
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        hold = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def add(self, token_id: int) -> str:
        """Add a token; return the new text that may be shown (possibly empty)."""
        self.token_ids.append(token_id)
        before = self._decode(self.token_ids[self._prefix : self._read])
        after = self._decode(self.token_ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or the token ends inside a character
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.token_ids)
        if self._stop:
            window = max(0, self.emitted - self._longest_stop)
            for stop in self._stop:
                at = self.text.find(stop, window)
                if at != -1:
                    self.stopped = True
                    self.text = self.text[:at]
                    return self._take(len(self.text))
        return self._take(len(self.text) - self._held_back(self.text))

    def finish(self) -> str:
        """The rest of the text at the end of the answer."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece
