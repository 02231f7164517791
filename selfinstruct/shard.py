"""`--shard i/N`: split a command's per-record work over N independent jobs (a Slurm array, N machines).

A record belongs to shard `blake2b(id) mod N`: stable across machines, Python versions and runs (unlike
`hash()`), independent of file order, and even for any id scheme. Every job sees the same input and keeps only
its share, so N jobs need no coordination; `selfinstruct merge` joins their run directories afterwards.

Commands adopt it with one field (`shard: ShardSpec = shard_field()`) and `Shard.parse(cfg.shard)`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field

T = TypeVar("T")
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, spec: str | None) -> Shard | None:
        """`"i/N"` with 0 ≤ i < N; None (no sharding) for None or `"0/1"`."""
        if spec is None:
            return None
        m = _SPEC.match(spec)
        if not m:
            raise ValueError(f"shard must look like i/N, e.g. 0/4 (got {spec!r})")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard i/N needs 0 <= i < N (got {spec!r})")
        return None if count == 1 else cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def of(self, key: str) -> int:
        """The shard a record id belongs to."""
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count

    def owns(self, key: str) -> bool:
        return self.of(key) == self.index

    def select(self, items: Iterable[T], key: Callable[[T], str]) -> list[T]:
        return [item for item in items if self.owns(key(item))]


def _check(spec: str | None) -> str | None:
    shard = Shard.parse(spec)
    return None if shard is None else str(shard)


ShardSpec = Annotated[str | None, AfterValidator(_check)]


def shard_field(what: str = "records") -> Any:
    """The `--shard` setting of a command (its help says what is partitioned)."""
    return Field(
        None,
        description=f"i/N: do only shard i of N of the {what} (by a stable hash of the id); "
        "join the N run directories with `selfinstruct merge`",
    )
