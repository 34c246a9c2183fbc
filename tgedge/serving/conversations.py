"""The conversations a served entry model keeps (docs/SERVING.md, "Conversations"); Triton-free.

A request that names a `conversation` is a turn of it: the server keeps each conversation's history (its questions,
answers and image bytes) and, for the `max_cached` most recently used ones, its KV cache (a
`tgedge.conversation.Conversation` on a pipeline view with a cache of its own), so a follow-up prefills only what
changed. Two bounds, oldest first out:

- `max_cached` conversations hold a KV cache (and their preprocessed images). A turn of a conversation whose cache
  was let go renders and prefills the whole conversation again from its history: its answer is the same, its
  response says `recomputed: true` (and `reused_tokens` 0).
- `max_kept` conversations are remembered at all (history and image bytes: small). A conversation forgotten beyond
  that, or never seen, starts anew at this request: the response's `turn` is 1, which is how a client sees that the
  server no longer had its history.

A conversation answers one turn at a time (a second request for it while one runs is refused), its images are the
ones its first turn sent (a later turn may send them again, or none; other images are refused: a new conversation id
is a new conversation), and its turns take the guide its first turn chose. Thread-safe: the entry model's request
threads call `turn` concurrently.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from tgedge.errors import TgedgeError

MAX_ID_CHARS = 256


@dataclass
class Record:
    """One conversation the server remembers."""
    images: tuple[bytes, ...]
    guide: str
    turns: list[tuple[str, str]] = field(default_factory=list)
    conversation: object | None = None  # a tgedge.conversation.Conversation while it holds a KV cache
    busy: bool = False


class Conversations:
    """`make(images: list[bytes], guide) -> Conversation` opens a conversation on a pipeline view of its own."""

    def __init__(self, make: Callable, max_cached: int, max_kept: int):
        if not 1 <= max_cached <= max_kept:
            raise TgedgeError(f"conversations: 1 <= max_cached ({max_cached}) <= max_kept ({max_kept}) is needed")
        self.make, self.max_cached, self.max_kept = make, max_cached, max_kept
        self.records: OrderedDict[str, Record] = OrderedDict()  # least recently used first
        self.lock = threading.Lock()
        self.evicted = 0  # KV caches let go (the history kept)
        self.forgotten = 0  # conversations dropped entirely

    def turn(self, cid: str, images: list[bytes], guide: str, ask: Callable) -> tuple[object, dict]:
        """Answer one turn of conversation `cid`: `ask(conversation) -> Turn` runs it; the turn, and the response's
        extra keys."""
        if not cid or len(cid) > MAX_ID_CHARS or not cid.isprintable():
            raise TgedgeError(f"conversation id {cid[:40]!r}: 1 to {MAX_ID_CHARS} printable characters")
        with self.lock:
            record = self.records.get(cid)
            if record is not None and record.busy:
                raise TgedgeError(f"conversation {cid!r} is answering another turn: send the next turn after its "
                                  "answer")
            if record is not None and images and tuple(images) != record.images:
                raise TgedgeError(f"conversation {cid!r} is about other images: a conversation keeps its first "
                                  "turn's images (start a new conversation id for these)")
            if record is not None and guide != record.guide:
                raise TgedgeError(f"conversation {cid!r} guides its images by the {record.guide} question: a turn "
                                  f"cannot switch to {guide!r}")
            new = record is None
            if new:
                record = self.records[cid] = Record(tuple(images), guide)
            self.records.move_to_end(cid)
            record.busy = True
            recomputed = not new and record.conversation is None and bool(record.turns)
            self._bound()
        try:
            if record.conversation is None:
                record.conversation = self.make(list(record.images), record.guide)
                record.conversation.turns = list(record.turns)  # the history, its KV cache prefilled anew
            turn = ask(record.conversation)
            record.turns = list(record.conversation.turns)
        except BaseException:
            if record.conversation is not None:
                record.conversation.close()  # what its cache holds is unknown: the next turn recomputes
            raise
        finally:
            with self.lock:
                record.busy = False
                self._bound()
        return turn, {"conversation": cid, "turn": len(record.turns), "recomputed": recomputed}

    def _bound(self) -> None:
        """Let the oldest idle conversations' KV caches go beyond `max_cached`, and forget the oldest idle ones
        beyond `max_kept` (busy ones stay: at most the entry's in-flight requests)."""
        cached = [r for r in self.records.values() if r.conversation is not None]
        for record in cached[:max(len(cached) - self.max_cached, 0)]:
            if not record.busy:
                record.conversation.close()
                record.conversation = None
                self.evicted += 1
        for cid in list(self.records)[:max(len(self.records) - self.max_kept, 0)]:
            record = self.records[cid]
            if not record.busy:
                if record.conversation is not None:
                    record.conversation.close()
                del self.records[cid]
                self.forgotten += 1

    def close(self) -> None:
        with self.lock:
            for record in self.records.values():
                if record.conversation is not None:
                    record.conversation.close()
            self.records.clear()
