"""Which block of a Ray run sends a request that several blocks share (identical prompts in blocks on
different actors), so that it is sent, and paid for, once.

    others = claims.claim("row-1500", keys)   # the block starting at row 1500: keys another block owns
    ...send the rest, journal them...
    claims.release("row-1500")                 # done: its answers are in the journal and parts now

The first block to claim a key owns it until it is released. A block is named by its first row, so a
block Ray retries (its actor died) is the same owner and sends what its dead attempt left unanswered.
A block that finds a key owned by another does not send it and does not wait for it: its row-map lines
name the key, the owner's answer serves them, and the driver counts the run complete only when every
such key has an answer from this run. A block claims its keys first and looks for answers already
journalled second, so a key released meanwhile is found answered and not sent again. Only the keys of
blocks in progress are held, so the table stays the size of what the actors are sending.
"""

from __future__ import annotations


class Claims:
    """Request keys owned by the blocks in progress."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}  # key -> the block that sends it
        self._owned: dict[str, list[str]] = {}  # block -> the keys it owns

    def claim(self, block: str, keys: list[str]) -> list[str]:
        """Claim `keys` for `block`; the ones another block owns (this block must not send them)."""
        mine = self._owned.setdefault(block, [])
        others: list[str] = []
        for key in keys:
            if self._owner.setdefault(key, block) == block:
                mine.append(key)  # (twice for a retried block: harmless)
            else:
                others.append(key)
        return others

    def release(self, block: str) -> None:
        """The block is done: its keys are free (their answers are journalled)."""
        for key in self._owned.pop(block, []):
            if self._owner.get(key) == block:
                del self._owner[key]

    def __len__(self) -> int:
        return len(self._owner)
