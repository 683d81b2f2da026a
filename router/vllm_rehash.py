"""vLLM's KV events re-hashed into kvcluster's chunk keys (llm-d's two-key design).

vLLM announces its blocks under its own hashes (its block size, hash function and
seed) together with the blocks' token ids. The router indexes kvcluster chunk keys
(:func:`kvcluster.common.hashing.chunk_hashes`: chained SHA-256 every
``settings.block_size`` tokens, one key per ``settings.tokens_per_hash`` tokens, seeded
with model id + tenant salt). So, per vLLM block hash, the rehasher keeps *our* chain
state after that block, and hashes each new block's tokens on from its parent's state.
vLLM's block size and hash seed then need not match ours. What must hold is checked on
every event, and a violation raises :class:`RehashMismatch` (the subscriber reports it
loudly and the ingestor flags the instance HASH_MISMATCH):

* vLLM's block size divides ``tokens_per_hash``: else a chunk boundary falls inside a
  vLLM block and vLLM's events cannot say whether the chunk is held;
* the token ids are there (``block_size`` of them per block hash);
* kvcluster's own connector events (``ownership`` "kvcluster", already chunk keys)
  announce the router's chunk size.

A chunk is held in a tier while every vLLM block of it is: a prefix with a hole is no
prefix to vLLM either. vLLM may announce one hash twice (two requests computed the same
block); holdings are sets, like Dynamo's radix tree, so the router never claims a block
after one of its copies was evicted. Blocks whose KV depends on more than token ids
(multimodal inputs, prompt embeddings) cannot be re-hashed: they and their descendants
are skipped and counted (``opaque_blocks``), since no text prompt can match them.

    vLLM BlockStored(hashes, parent, token_ids, medium)  ->  BlockStored(chunk keys, tier)
    vLLM BlockRemoved(hashes, medium)                    ->  BlockRemoved(chunk keys, tier)
    vLLM AllBlocksCleared                                ->  AllCleared(DEVICE)
    ownership "kvcluster" (connector tiers)              ->  passed through
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from kvcluster.common.event_media import KVCLUSTER_OWNERSHIP, tier_of_medium
from kvcluster.common.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    HashSettings,
    KVEvent,
    Tier,
)
from kvcluster.common.hashing import BlockHash, ExtraKeys, hash_block, root_hash

log = logging.getLogger("router.vllm")


class RehashMismatch(ValueError):
    """vLLM's events cannot be turned into our chunk keys: a setting that matters."""

    def __init__(self, message: str, settings: HashSettings | None = None):
        super().__init__(message)
        self.settings = settings
        """The settings the instance effectively announces (None: none a router has),
        forwarded so the ingestor flags it HASH_MISMATCH and names the difference."""


class UnknownParent(ValueError):
    """A block whose parent the rehasher never saw (events were lost before it)."""


@dataclass(slots=True)
class _Node:
    """Our chain state after one vLLM block."""

    chain: BlockHash
    """Our chained hash through the last whole hash step."""
    tail: tuple[int, ...]
    """Tokens after ``chain`` (fewer than ``settings.block_size``)."""
    end: int
    """Tokens from the sequence start through this block."""
    extra: ExtraKeys
    members: tuple[Hashable, ...]
    """vLLM blocks of this block's chunk, from the chunk's first through this one."""
    chunks: set[int] = field(default_factory=set)
    """u64 keys of the (completed) chunks this block is a member of."""


@dataclass(slots=True)
class _Chunk:
    members: tuple[Hashable, ...]
    announced: set[Tier] = field(default_factory=set)


class VLLMRehasher:
    """One instance's translator; feed it that instance's events in sequence order."""

    def __init__(self, settings: HashSettings):
        """
        Args:
            settings: the router's (model id, hash step ``block_size``, chunk tokens
                ``tokens_per_hash``).
        """
        if settings.tokens_per_hash <= 0:
            raise ValueError(f"the rehasher needs settings.tokens_per_hash > 0, got {settings}")
        self.settings = settings
        self._nodes: dict[Hashable, _Node] = {}
        self._chunks: dict[int, _Chunk] = {}
        self._held: dict[Tier, set[Hashable]] = {t: set() for t in Tier}
        self._opaque: set[Hashable] = set()
        self.opaque_blocks = 0
        """Blocks skipped because their KV depends on more than token ids."""
        self.skipped_groups = 0
        """Events of KV cache groups other than the first (hybrid models)."""

    # ------------------------------------------------------------ public API

    def translate(self, events: list[dict[str, Any]], lenient: bool = False) -> list[KVEvent]:
        """Our events for one vLLM batch's events (msgpack maps tagged by ``type``).

        Args:
            lenient: skip a block whose parent is unknown instead of raising (after a
                reset, blocks chained on lost history are expected).

        Raises:
            RehashMismatch: a block size, token count or chunk size we cannot re-hash.
            UnknownParent: (not lenient) a block whose parent was never seen.
            ValueError: a malformed event.
        """
        out: list[KVEvent] = []
        for event in events:
            kind = event.get("type") if isinstance(event, dict) else None
            try:
                if kind == "BlockStored":
                    out += self._stored(event, lenient)
                elif kind == "BlockRemoved":
                    out += self._removed(event)
                elif kind == "AllBlocksCleared":
                    out += self._cleared()
                else:
                    raise ValueError(f"unknown vLLM KV event {event!r:.200}")
            except (KeyError, TypeError) as exc:
                raise ValueError(f"malformed vLLM {kind} event ({exc!r}): {event!r:.200}") from exc
        return out

    def clear(self) -> None:
        """Forget everything (the instance's view is being reset)."""
        self._nodes.clear()
        self._chunks.clear()
        self._held = {t: set() for t in Tier}
        self._opaque.clear()

    @property
    def num_blocks(self) -> int:
        """vLLM blocks whose chain state is kept."""
        return len(self._nodes)

    # ------------------------------------------------------------ stored

    def _stored(self, event: dict, lenient: bool) -> list[KVEvent]:
        tier = tier_of_medium(event.get("medium"))
        hashes = list(event["block_hashes"])
        if event.get("ownership") == KVCLUSTER_OWNERSHIP:
            self._check_connector(event)
            parent = event.get("parent_block_hash")
            return [BlockStored(tuple(int(h) for h in hashes), tier, parent)]
        if not self._first_group(event):
            return []
        block_size = int(event["block_size"])
        tokens = list(event.get("token_ids") or [])
        self._check_sizes(block_size, len(hashes), len(tokens))
        extras = list(event.get("extra_keys") or [])
        lora = event.get("lora_name") or ""
        parent_hash = event.get("parent_block_hash")
        parent = None if parent_hash is None else self._known_parent(parent_hash, lenient)
        if parent_hash is not None and parent is None:
            return []  # chained on history this view never saw (or on opaque KV)
        chunks: list[int] = []
        for i, h in enumerate(hashes):
            extra = extras[i] if i < len(extras) else None
            parent = self._block(h, parent, tokens[i * block_size:(i + 1) * block_size],
                                 extra, lora)
            if parent is None:  # opaque: its descendants in this event are too
                self._opaque.update(hashes[i:])
                self.opaque_blocks += len(hashes) - i
                break
            self._held[tier].add(h)
            chunks += self._newly_held(h, tier)
        return [BlockStored(tuple(chunks), tier)] if chunks else []

    def _known_parent(self, parent_hash: Hashable, lenient: bool) -> _Node | None:
        """The chain state before an event's first block; None: skip the event."""
        if parent_hash in self._opaque:
            return None
        node = self._nodes.get(parent_hash)
        if node is None and not lenient:
            raise UnknownParent(f"vLLM block {_short(parent_hash)} is a stored block's parent "
                                "but was never announced: events were lost")
        return node

    def _block(self, h: Hashable, parent: _Node | None, tokens: list[int], extra,
               lora: str) -> _Node | None:
        """Add (or refresh) one vLLM block's node; None when it cannot be re-hashed.

        Args:
            parent: the previous block's node; None: ``h`` starts a sequence.
        """
        salt = _salt_of(extra, lora, first=parent is None)
        if salt is None:
            return None
        if parent is None:
            keys = ExtraKeys(self.settings.model_id, salt, lora)
            parent = _Node(root_hash(keys), (), 0, keys, ())
        node = self._nodes.get(h)
        if node is None:  # else announced again: same vLLM hash, same prefix, same chain
            node = self._nodes[h] = self._extend(parent, tokens)
        node.members = self._members(parent, h)
        if node.end % self.settings.tokens_per_hash == 0:
            self._complete_chunk(node)  # again too: a forgotten member dropped the chunk
        return node

    def _extend(self, parent: _Node, tokens: list[int]) -> _Node:
        step, chain = self.settings.block_size, parent.chain
        run = [*parent.tail, *tokens]
        whole = len(run) - len(run) % step
        for start in range(0, whole, step):
            chain = hash_block(chain, run[start:start + step])
        return _Node(chain, tuple(run[whole:]), parent.end + len(tokens), parent.extra, ())

    def _members(self, parent: _Node, h: Hashable) -> tuple[Hashable, ...]:
        starts_chunk = parent.end % self.settings.tokens_per_hash == 0
        return (h,) if starts_chunk else (*parent.members, h)

    def _complete_chunk(self, node: _Node) -> None:
        assert not node.tail, "a chunk boundary is a hash-step boundary"
        key = node.chain.u64
        self._chunks.setdefault(key, _Chunk(node.members))
        for member in node.members:
            member_node = self._nodes.get(member)
            if member_node is not None:
                member_node.chunks.add(key)

    def _newly_held(self, h: Hashable, tier: Tier) -> list[int]:
        """Chunks of block ``h`` that are now wholly held in ``tier`` and not yet announced."""
        out = []
        for key in sorted(self._nodes[h].chunks):
            info = self._chunks[key]
            if tier not in info.announced and all(m in self._held[tier] for m in info.members):
                info.announced.add(tier)
                out.append(key)
        return out

    # ------------------------------------------------------------ removed / cleared

    def _removed(self, event: dict) -> list[KVEvent]:
        tier = tier_of_medium(event.get("medium"))
        hashes = list(event["block_hashes"])
        if event.get("ownership") == KVCLUSTER_OWNERSHIP:
            return [BlockRemoved(tuple(int(h) for h in hashes), tier)]
        if not self._first_group(event):
            return []
        gone: list[int] = []
        for h in hashes:
            self._held[tier].discard(h)
            node = self._nodes.get(h)
            if node is None:
                self._opaque.discard(h)
                continue
            for key in sorted(node.chunks):
                info = self._chunks.get(key)
                if info is not None and tier in info.announced:
                    info.announced.discard(tier)
                    gone.append(key)
            self._forget_if_unheld(h)
        return [BlockRemoved(tuple(gone), tier)] if gone else []

    def _cleared(self) -> list[KVEvent]:
        """vLLM reset its prefix cache: its own (device) blocks are gone, our tiers stay."""
        held, self._held[Tier.DEVICE] = self._held[Tier.DEVICE], set()
        for info in self._chunks.values():
            info.announced.discard(Tier.DEVICE)
        for h in held:
            self._forget_if_unheld(h)
        self._opaque.clear()
        return [AllCleared(Tier.DEVICE)]

    def _forget_if_unheld(self, h: Hashable) -> None:
        """Drop a block no tier holds, and the chunks it belongs to (they cannot be held
        until vLLM stores it again, which announces its whole chunk anew)."""
        if any(h in held for held in self._held.values()):
            return
        node = self._nodes.pop(h)
        for key in node.chunks:
            info = self._chunks.pop(key, None)
            if info is None:
                continue
            for member in info.members:
                other = self._nodes.get(member)
                if other is not None:
                    other.chunks.discard(key)

    # ------------------------------------------------------------ checks

    def _first_group(self, event: dict) -> bool:
        """Only KV cache group 0 is indexed: a hybrid model's other groups hold
        sliding-window or state KV under the same hashes, which a prefix match cannot use."""
        if event.get("group_idx") in (None, 0):
            return True
        self.skipped_groups += 1
        return False

    def _check_sizes(self, block_size: int, num_hashes: int, num_tokens: int) -> None:
        chunk = self.settings.tokens_per_hash
        if block_size <= 0 or chunk % block_size:
            theirs = self._as_settings(block_size, block_size)
            raise RehashMismatch(
                f"vLLM block_size {block_size} does not divide kvcluster's chunk of {chunk} "
                f"tokens: a chunk boundary falls inside a vLLM block, so vLLM's events cannot "
                f"say whether a chunk is held (give vLLM a block size dividing {chunk})", theirs)
        if num_tokens != num_hashes * block_size:
            raise RehashMismatch(
                f"vLLM BlockStored carries {num_tokens} token ids for {num_hashes} blocks of "
                f"{block_size} tokens: blocks without their token ids cannot be re-hashed")

    def _check_connector(self, event: dict) -> None:
        chunk = event.get("block_size")
        if chunk != self.settings.tokens_per_hash:
            raise RehashMismatch(
                f"kvcluster connector announces chunk keys of {chunk} tokens, the router "
                f"indexes chunks of {self.settings.tokens_per_hash} (store.chunk_tokens differ)",
                self._as_settings(self.settings.block_size, chunk))

    def _as_settings(self, block_size, tokens_per_hash) -> HashSettings | None:
        try:
            return HashSettings(self.settings.model_id, int(block_size), int(tokens_per_hash),
                                self.settings.hash_version)
        except (TypeError, ValueError):
            return None


def _salt_of(extra, lora: str, first: bool) -> str | None:
    """The tenant salt a block's extra keys imply; None: KV beyond token ids (opaque).

    vLLM publishes, per block: the LoRA name (when set), ``(mm_identifier, offset)``
    pairs, the cache_salt (first block only) and prompt-embeds digests, untagged.
    """
    items = [i for i in (extra or ()) if not (lora and i == lora)]
    if not items:
        return ""
    if first and len(items) == 1 and isinstance(items[0], str):
        return items[0]
    return None


def _short(h: Hashable) -> str:
    return h[:8].hex() if isinstance(h, bytes) else str(h)
