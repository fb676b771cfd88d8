"""Incremental detokenization with stop strings, for streaming answers.

Pure logic: feed token ids, get the text that is safe to show now. Text that might
still become a stop string, or an incomplete UTF-8 character, is held back.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (before any stop cut)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

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
        self.text = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.text.endswith("\ufffd"):
            return ""  # the token ends in the middle of a character
        for stop in self._stop:
            at = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
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
