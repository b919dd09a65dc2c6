"""One worker reads the store and posts immutable snapshots as messages; widgets only render them."""

from __future__ import annotations

from textual.message import Message

from store.reader import StudySnapshot


class SnapshotReady(Message):
    def __init__(self, snapshot: StudySnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class PollFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error
