"""Text out of a stream of token ids: incremental detokenizing and stop sequences.

Each new token's text is the decode of a short window of ids ending with it, less the decode of the
window before it: the window's first pieces stand in for the context (a SentencePiece decode drops
the leading space of whatever comes first, and a character's byte pieces only decode once all have
arrived), so the cost per token does not grow with the length of the answer. Streamed and whole
answers come from this same class, so they are the same text.
"""
from __future__ import annotations

CONTEXT_TOKENS = 6     # ids of the prompt's end that stand in for the context of the first new token


class TextStream:
    """push(token) -> (text that may be shown now, whether a stop sequence ended the answer);
    finish() -> the text still held back (a possible start of a stop sequence) once the answer ends."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = [s for s in stop if s]
        self.held = ""           # decoded, not yet shown: it could begin a stop sequence
        self.text = ""           # everything shown
        self.stopped = False

    def _delta(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""            # a multi-byte character still incomplete: wait for its last piece
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(int(token))
        pending = self.held + self._delta()
        for s in self.stop:
            at = pending.find(s)
            if at >= 0:
                self.stopped = True
                out, self.held = pending[:at], ""
                self.text += out
                return out, True
        keep = max((n for s in self.stop for n in range(min(len(s) - 1, len(pending)), 0, -1)
                    if pending.endswith(s[:n])), default=0)
        out = pending[:len(pending) - keep]
        self.held = pending[len(pending) - keep:]
        self.text += out
        return out, False

    def finish(self) -> str:
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.ids[self.prefix:])[len(self.tokenizer.decode(self.ids[self.prefix:self.read])):]
        out, self.held = self.held + tail, ""
        for s in self.stop:
            if s in out:
                out = out[:out.find(s)]
        self.text += out
        return out
