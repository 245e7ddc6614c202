"""Which block of a Ray run sends a request that several blocks share, so that it is sent, and paid for,
once (docs/decisions.md, "Ray runs: one limit, one payment")."""

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
