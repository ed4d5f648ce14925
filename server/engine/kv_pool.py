"""The KV-cache block pool: which fixed-size blocks of the cache are free, shared, or cached.

Automatic prefix caching: a full block whose KV has been computed is registered under a hash of
everything its KV depends on (the composition it was computed under and every token up to its end, see
`block_hashes`). A later request whose prompt starts with the same blocks under the same composition
takes them instead of recomputing them. Blocks are reference counted: a block shared by running requests
is read-only for all of them (only full blocks are shared, and a request only writes past its cached
prefix), and a block nobody holds is free. Free blocks that are cached stay cached until they are
reused, least recently freed first; free blocks that hold nothing worth keeping are reused before them.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections import OrderedDict

_HASH_BYTES = 16
"""blake2b digest size: 128 bits, so two different prefixes share a hash with negligible probability."""


def composition_root(module_ids: tuple[str, ...], gates: tuple[float, ...], generations: tuple[int, ...],
                     salt: str | None = None) -> bytes:
    """The hash every block chain of one composition starts from: its modules, each module's generation
    (a module replaced under the same name is another module) and the exact gates (float64 bits), and the
    request's cache salt when it has one (`Request.cache_salt`: only requests of the same salt share KV)."""
    digest = hashlib.blake2b(b"tessera-kv", digest_size=_HASH_BYTES)
    for module_id, gate, generation in zip(module_ids, gates, generations):
        name = module_id.encode()
        digest.update(struct.pack("<I", len(name)) + name + struct.pack("<dq", gate, generation))
    if salt is not None:  # after the modules, under a tag no module entry can produce (its length would be 2**32-1)
        salted = salt.encode()
        digest.update(struct.pack("<I", 0xFFFFFFFF) + struct.pack("<I", len(salted)) + salted)
    return digest.digest()


def block_hashes(root: bytes, token_ids: list[int], start: int, stop: int, block_size: int,
                 parent: bytes | None = None) -> list[bytes]:
    """Hashes of blocks `start..stop-1` of `token_ids`; each chains its parent's hash (`parent`, the hash of
    block start-1, or `root` for block 0) with its own tokens, so it names the whole prefix up to its end."""
    hashes, previous = [], root if start == 0 else parent
    if start > 0 and parent is None:
        raise ValueError("block hashes after block 0 need the previous block's hash")
    for index in range(start, stop):
        tokens = array("q", token_ids[index * block_size : (index + 1) * block_size])
        previous = hashlib.blake2b(previous + tokens.tobytes(), digest_size=_HASH_BYTES).digest()
        hashes.append(previous)
    return hashes


class BlockPool:
    """KV blocks (plain ints, indices into every layer's cache tensor) with reference counts and a prefix
    cache. With `caching` off no block is ever registered, and the pool is a plain free list."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        """Blocks nobody holds, next to be reused first."""
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (cached ones included: they are reused when needed)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks for new KV (a cached one taken here leaves the cache); the caller checks
        `num_free` first."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._uncache(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block nobody holds any more is free: at the front of the
        reuse order when it is not cached, else at the back, a request's last block ahead of its first
        (a prefix's tail is worth less than its head, which every longer prefix needs)."""
        for block in reversed(blocks):
            if self._refs[block] < 1:
                raise RuntimeError(f"KV block {block} freed more often than it was taken")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:
                    self._free.move_to_end(block, last=False)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (nothing changes; `take` them to use them)."""
        hits = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def num_free_among(self, blocks: list[int]) -> int:
        """How many of `blocks` are free now (taking them shrinks `num_free` by that much)."""
        return sum(1 for block in blocks if self._refs[block] == 0)

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks from `lookup`: one more reference each, out of the free list if they were free."""
        for block in blocks:
            if block not in self._hash_of:
                raise RuntimeError(f"KV block {block} is not cached")
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """Cache a held block whose KV is complete under `block_hash` (or will be once the step being planned
        has run). A hash cached already keeps its
        block (this one, with the same content, then stays uncached and is freed as such)."""
        if not self.caching or block_hash in self._block_of or block in self._hash_of:
            return
        if self._refs[block] < 1:
            raise RuntimeError(f"KV block {block} is registered but nobody holds it")
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block

    def reset_cache(self) -> int:
        """Forget every cached prefix (held blocks stay held; their users are not affected); the number of
        blocks forgotten."""
        count = len(self._hash_of)
        for block in list(self._hash_of):
            self._uncache(block)
            if self._refs[block] == 0:
                self._free.move_to_end(block, last=False)
        return count

    def _uncache(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]
