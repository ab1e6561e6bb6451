"""Host core of the engine: varlen packing, block content hashes, the KV-cache block manager, slot mapping and
batch planning.

Two implementations with identical results (same return values, same exception types):
- ``ixc_engine._core``: C++ (pybind11, csrc/core.cpp), the one the engine uses;
- this module's pure-Python/numpy twin, the fallback and the reference the tests compare against.

``get_host_core(kind)`` picks one: ``"auto"`` (the default) takes the compiled core when it imports and matches
``HOST_CORE_VERSION``, else the Python one; ``"cpp"`` / ``"python"`` force one. With ``kind="auto"`` the env
variable ``IXC_ENGINE_HOST`` (``auto`` | ``cpp`` | ``python``) decides instead.

Block hash (bit-identical in both; all arithmetic mod 2**64, keys reinterpreted as uint64):
    mix(z)   = splitmix64 finalizer: z ^= z >> 30; z *= B1; z ^= z >> 27; z *= B2; z ^= z >> 31
    digest_i = D0, then for each key k of block i in order: d = mix(d ^ (k * M1 + C1))
    h_i      = mix((h_{i-1} * M2) ^ digest_i),   h_{-1} = seed
with the constants below. The per-block digests are independent, so numpy computes them for all blocks at once;
only the short chain over blocks is sequential.
"""

from __future__ import annotations

import importlib
import itertools
import operator
import os
import types
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = [
    "HOST_CORE_NAMES",
    "HOST_CORE_VERSION",
    "BlockManager",
    "HostCore",
    "block_hashes",
    "block_table_array",
    "build_slot_mapping",
    "get_host_core",
    "pack_varlen",
    "plan_batches",
    "python_host_core",
]

HOST_CORE_VERSION = 1  # must equal kHostCoreVersion in csrc/core.cpp

HOST_CORE_NAMES = (
    "pack_varlen",
    "block_hashes",
    "BlockManager",
    "build_slot_mapping",
    "block_table_array",
    "plan_batches",
)

_MASK = (1 << 64) - 1
_MIX_B1 = 0xBF58476D1CE4E5B9
_MIX_B2 = 0x94D049BB133111EB
_KEY_MUL = 0x9E3779B97F4A7C15  # M1: 2**64 / golden ratio (odd)
_KEY_ADD = 0xD1B54A32D192ED03  # C1
_DIGEST_INIT = 0x243F6A8885A308D3  # D0: fractional digits of pi
_CHAIN_MUL = 0xC2B2AE3D27D4EB4F  # M2 (odd)


class HostCore(Protocol):
    """What ``get_host_core`` returns (the ``ixc_engine._core`` module or the Python namespace)."""

    IMPLEMENTATION: str
    HOST_CORE_VERSION: int
    BlockManager: type

    def pack_varlen(self, q_lens: Any, start_pos: Any) -> tuple[np.ndarray, np.ndarray]: ...

    def block_hashes(self, keys: Any, block_size: int, seed: int = 0) -> np.ndarray: ...

    def build_slot_mapping(
        self, block_tables: Sequence[Sequence[int]], start_pos: Any, q_lens: Any, block_size: int
    ) -> np.ndarray: ...

    def block_table_array(self, block_tables: Sequence[Sequence[int]], max_blocks: int | None = None) -> np.ndarray: ...

    def plan_batches(self, n_tokens: Any, max_batch_tokens: int, max_seqs: int) -> list[np.ndarray]: ...


# --------------------------------------------------------------------------------------------- argument checks
# Same rules as csrc/core.cpp: array-likes go through numpy; a non-empty one needs an integer dtype (TypeError)
# and must be 1-D (ValueError); an empty one may have any dtype (np.asarray([]) is float64).


def _as_int_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got {a.ndim} dimensions")
    return a


def _int_array_1d(x: Any, name: str) -> np.ndarray:
    return _as_int_array(x, name).astype(np.int64, copy=False)


def _to_index(v: Any, name: str) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected integers, got {type(v).__name__}") from None
    if not -(1 << 63) <= i < (1 << 63):
        raise ValueError(f"{name}: integer out of int64 range")
    return i


def _to_hash(v: Any, name: str) -> int:
    try:
        h = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected integers, got {type(v).__name__}") from None
    if not 0 <= h <= _MASK:
        raise ValueError(f"{name}: hashes must lie in [0, 2**64), got {h}")
    return h


def _hash_list(x: Any, name: str) -> list[int]:
    if isinstance(x, np.ndarray):
        a = _as_int_array(x, name)
        if a.size and np.issubdtype(a.dtype, np.signedinteger) and (a < 0).any():
            raise ValueError(f"{name}: hashes must lie in [0, 2**64), got {int(a[a < 0][0])}")
        return a.astype(np.uint64).tolist()
    return [_to_hash(v, name) for v in x]


def _index_list(x: Any, name: str) -> list[int]:
    if isinstance(x, np.ndarray):
        return _int_array_1d(x, name).tolist()
    return [_to_index(v, name) for v in x]


def _tables(block_tables: Any, name: str) -> list[np.ndarray]:
    if isinstance(block_tables, np.ndarray) and block_tables.ndim != 2:
        raise ValueError(f"{name}: a block-table array must be 2-D, got {block_tables.ndim} dimensions")
    out = []
    for t in block_tables:
        if isinstance(t, np.ndarray):
            out.append(_int_array_1d(t, name))
        elif isinstance(t, Sequence) and not isinstance(t, (str, bytes)):
            out.append(np.array([_to_index(v, name) for v in t], dtype=np.int64))
        else:
            raise TypeError(f"{name}: each block table must be a sequence or array of ints")
    return out


# --------------------------------------------------------------------------------------------- functions


def pack_varlen(q_lens: Any, start_pos: Any) -> tuple[np.ndarray, np.ndarray]:
    """(q_lens int[B], start_pos int[B]) -> (cu_seqlens int32[B+1], positions int64[T]).

    Sequence b contributes q_lens[b] new tokens at positions start_pos[b] .. start_pos[b] + q_lens[b] - 1
    (start_pos = number of cached prefix tokens); T = sum(q_lens).
    """
    q = _int_array_1d(q_lens, "q_lens")
    s = _int_array_1d(start_pos, "start_pos")
    if len(s) != len(q):
        raise ValueError(f"start_pos: length {len(s)} != len(q_lens) {len(q)}")
    for b in range(len(q)):  # same error order as the C++ loop
        if q[b] < 0:
            raise ValueError(f"q_lens: entries must be >= 0, got {q[b]}")
        if s[b] < 0:
            raise ValueError(f"start_pos: entries must be >= 0, got {s[b]}")
    cu64 = np.zeros(len(q) + 1, dtype=np.int64)
    np.cumsum(q, out=cu64[1:])
    if cu64[-1] > np.iinfo(np.int32).max:
        raise ValueError("q_lens: total token count does not fit int32 cu_seqlens")
    total = int(cu64[-1])
    # positions[t] = t - cu[b] + start_pos[b] for the sequence b owning token t
    offsets = np.repeat(s - cu64[:-1], q)
    positions = np.arange(total, dtype=np.int64) + offsets
    return cu64.astype(np.int32), positions


def _mix64(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(_MIX_B1)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(_MIX_B2)
    return z ^ (z >> np.uint64(31))


def _mix64_int(z: int) -> int:
    z ^= z >> 30
    z = (z * _MIX_B1) & _MASK
    z ^= z >> 27
    z = (z * _MIX_B2) & _MASK
    return z ^ (z >> 31)


def block_hashes(keys: Any, block_size: int, seed: int = 0) -> np.ndarray:
    """Chained content hash of every FULL block of ``keys`` -> uint64[len(keys) // block_size].

    h_i depends on keys[0 : (i+1)*block_size] and the seed only (definition in the module docstring); a trailing
    partial block gets no hash. Keys are token ids at text positions and 64-bit media keys at image positions, so
    equal prompts with equal images give equal hashes.
    """
    block_size = _to_index(block_size, "block_size")
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    h = _to_hash(seed, "seed")
    k = _as_int_array(keys, "keys").astype(np.uint64)  # two's complement reinterpretation for signed keys
    nb = len(k) // block_size
    out = np.empty(nb, dtype=np.uint64)
    if nb == 0:
        return out
    kb = k[: nb * block_size].reshape(nb, block_size)
    with np.errstate(over="ignore"):
        d = np.full(nb, _DIGEST_INIT, dtype=np.uint64)
        for j in range(block_size):  # vectorised over blocks, sequential over positions in a block
            d = _mix64(d ^ (kb[:, j] * np.uint64(_KEY_MUL) + np.uint64(_KEY_ADD)))
    for i, di in enumerate(d.tolist()):
        h = _mix64_int(((h * _CHAIN_MUL) & _MASK) ^ di)
        out[i] = h
    return out


def build_slot_mapping(block_tables: Any, start_pos: Any, q_lens: Any, block_size: int) -> np.ndarray:
    """KV-cache slot of every new token -> int64[T].

    Token j of sequence b sits at position p = start_pos[b] + j and goes to slot
    block_tables[b][p // block_size] * block_size + p % block_size.
    """
    block_size = _to_index(block_size, "block_size")
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    tables = _tables(block_tables, "block_tables")
    s = _int_array_1d(start_pos, "start_pos")
    q = _int_array_1d(q_lens, "q_lens")
    if not len(tables) == len(s) == len(q):
        raise ValueError(f"block_tables, start_pos, q_lens: lengths differ ({len(tables)}, {len(s)}, {len(q)})")
    for b in range(len(tables)):
        if q[b] < 0:
            raise ValueError(f"q_lens: entries must be >= 0, got {q[b]}")
        if s[b] < 0:
            raise ValueError(f"start_pos: entries must be >= 0, got {s[b]}")
        if q[b] > 0:
            need = (s[b] + q[b] + block_size - 1) // block_size
            if len(tables[b]) < need:
                raise ValueError(
                    f"block_tables[{b}]: has {len(tables[b])} blocks, positions up to {s[b] + q[b] - 1} need {need}"
                )
    parts = []
    for b, table in enumerate(tables):
        p = np.arange(s[b], s[b] + q[b], dtype=np.int64)
        blk = table[p // block_size]
        if (blk < 0).any():
            raise ValueError(f"block_tables[{b}]: negative block id {int(blk[blk < 0][0])}")
        parts.append(blk * block_size + p % block_size)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def block_table_array(block_tables: Any, max_blocks: int | None = None) -> np.ndarray:
    """Block tables padded with 0 -> int32[B, max_blocks] (max_blocks=None: the longest table's length)."""
    tables = _tables(block_tables, "block_tables")
    width = max((len(t) for t in tables), default=0)
    if max_blocks is not None:
        mb = _to_index(max_blocks, "max_blocks")
        if mb < 0:
            raise ValueError(f"max_blocks: must be >= 0, got {mb}")
        if width > mb:
            raise ValueError(f"block_tables: a table has {width} blocks > max_blocks {mb}")
        width = mb
    out = np.zeros((len(tables), width), dtype=np.int32)
    for b, t in enumerate(tables):
        bad = (t < 0) | (t > np.iinfo(np.int32).max)
        if bad.any():
            raise ValueError(f"block_tables[{b}]: block id {int(t[bad][0])} outside [0, 2**31)")
        out[b, : len(t)] = t
    return out


def plan_batches(n_tokens: Any, max_batch_tokens: int, max_seqs: int) -> list[np.ndarray]:
    """Split N ordered work items into consecutive batches -> list of int32 index arrays.

    A batch closes when the next item would push its token sum over ``max_batch_tokens`` or its size over
    ``max_seqs``; an item larger than the token budget therefore lands alone in its own batch.
    """
    max_batch_tokens = _to_index(max_batch_tokens, "max_batch_tokens")
    max_seqs = _to_index(max_seqs, "max_seqs")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens: must be >= 1, got {max_batch_tokens}")
    if max_seqs < 1:
        raise ValueError(f"max_seqs: must be >= 1, got {max_seqs}")
    n = _int_array_1d(n_tokens, "n_tokens")
    if (n < 0).any():
        raise ValueError(f"n_tokens: entries must be >= 0, got {int(n[n < 0][0])}")
    starts = []
    total = count = 0
    for i, ni in enumerate(n.tolist()):
        if count and (total + ni > max_batch_tokens or count == max_seqs):
            total = count = 0
        if count == 0:
            starts.append(i)
        total += ni
        count += 1
    starts.append(len(n))
    return [np.arange(a, b, dtype=np.int32) for a, b in itertools.pairwise(starts)]


class BlockManager:
    """Paged KV-cache block allocator with reference counts and a prefix index (content hash -> block).

    Each block is exactly one of: free (ref 0, unindexed, FIFO free list), used (ref > 0), or cached (ref 0,
    indexed, LRU list; evicted oldest-release first when free blocks run out). Callers releasing a sequence
    may pass its table reversed so that its tail blocks are evicted before its (more shareable) prefix.
    """

    __slots__ = ("_bs", "_free", "_hash", "_index", "_lru", "_n", "_ref")

    def __init__(self, num_blocks: int, block_size: int) -> None:
        num_blocks = _to_index(num_blocks, "num_blocks")
        block_size = _to_index(block_size, "block_size")
        if not 1 <= num_blocks < (1 << 31) - 1:
            raise ValueError(f"num_blocks: must be in [1, 2**31 - 1), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self._n = num_blocks
        self._bs = block_size
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks  # hash of indexed blocks, else None
        self._index: dict[int, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()

    @property
    def num_blocks(self) -> int:
        return self._n

    @property
    def block_size(self) -> int:
        return self._bs

    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out: free + evictable cached."""
        return len(self._free) + len(self._lru)

    def num_cached(self) -> int:
        """Blocks in the prefix index (referenced or evictable)."""
        return len(self._index)

    def num_evictable(self) -> int:
        return len(self._lru)

    def _check_id(self, v: Any, name: str) -> int:
        b = _to_index(v, name)
        if not 0 <= b < self._n:
            raise ValueError(f"{name}: block id {b} outside [0, {self._n})")
        return b

    def ref_count(self, block_id: int) -> int:
        return self._ref[self._check_id(block_id, "block_id")]

    def can_allocate(self, n: int) -> bool:
        n = _to_index(n, "n")
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        return n <= self.num_free()

    def match_prefix(self, hashes: Iterable[int] | np.ndarray) -> list[int]:
        """Block ids of the longest run of leading hashes found in the index; each gains one reference."""
        out = []
        for h in _hash_list(hashes, "hashes"):
            b = self._index.get(h)
            if b is None:
                break
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
            out.append(b)
        return out

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref count 1: free blocks first, then evicted LRU cached ones. All or nothing."""
        n = _to_index(n, "n")
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        if n > self.num_free():
            raise MemoryError(
                f"cannot allocate {n} blocks: only {self.num_free()} available "
                f"({len(self._free)} free + {len(self._lru)} evictable cached)"
            )
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._lru.popitem(last=False)
                del self._index[self._hash[b]]
                self._hash[b] = None
            self._ref[b] = 1
            out.append(b)
        return out

    def register(self, block_id: int, h: int) -> bool:
        """Record that (allocated) block ``block_id`` holds content hash ``h``.

        Returns True if the block is now the index entry for ``h``; False if ``h`` was already indexed to another
        block (that mapping is kept and this block stays unindexed).
        """
        block_id = _to_index(block_id, "block_id")  # conversion order as in the C++ binding
        h = _to_hash(h, "h")
        b = self._check_id(block_id, "block_id")
        if self._ref[b] == 0:
            raise ValueError(f"block_id: block {b} is not allocated (ref count 0)")
        if self._hash[b] is not None:
            if self._hash[b] == h:
                return True
            raise ValueError(f"block_id: block {b} is already registered with another hash")
        if h in self._index:
            return False
        self._index[h] = b
        self._hash[b] = h
        return True

    def register_blocks(self, block_ids: Iterable[int] | np.ndarray, hashes: Iterable[int] | np.ndarray) -> list[bool]:
        """``[register(b, h) for b, h in zip(block_ids, hashes)]`` in one call; on an error the pairs before it stay
        registered."""
        ids = _index_list(block_ids, "block_ids")
        hs = _hash_list(hashes, "hashes")
        if len(ids) != len(hs):
            raise ValueError(f"block_ids, hashes: lengths differ ({len(ids)}, {len(hs)})")
        return [self.register(b, h) for b, h in zip(ids, hs)]

    def release(self, block_ids: Iterable[int] | np.ndarray) -> None:
        """Drop one reference per listed id; blocks reaching 0 become cached (if indexed) or free. All or nothing."""
        ids = _index_list(block_ids, "block_ids")
        zeroed = []
        for i, b in enumerate(ids):
            err = None
            if not 0 <= b < self._n:
                err = f"block_ids: block id {b} outside [0, {self._n})"
            elif self._ref[b] == 0:
                err = f"block_ids: block {b} is not allocated (double release?)"
            if err is not None:
                for c in ids[:i]:
                    self._ref[c] += 1
                raise ValueError(err)
            self._ref[b] -= 1
            if self._ref[b] == 0:
                zeroed.append(b)
        for b in zeroed:
            if self._hash[b] is not None:
                self._lru[b] = None
            else:
                self._free.append(b)


def python_host_core() -> types.SimpleNamespace:
    """The pure-Python implementation, shaped like the ``ixc_engine._core`` module."""
    return types.SimpleNamespace(
        IMPLEMENTATION="python",
        HOST_CORE_VERSION=HOST_CORE_VERSION,
        pack_varlen=pack_varlen,
        block_hashes=block_hashes,
        BlockManager=BlockManager,
        build_slot_mapping=build_slot_mapping,
        block_table_array=block_table_array,
        plan_batches=plan_batches,
    )


def _load_cpp() -> tuple[Any, str | None]:
    """(module, None) or (None, why it cannot be used)."""
    try:
        mod = importlib.import_module("ixc_engine._core")
    except ImportError as exc:
        return None, f"ixc_engine._core is not importable ({exc}); build it with `pip install -e .`"
    version = getattr(mod, "HOST_CORE_VERSION", None)
    if version != HOST_CORE_VERSION:
        return None, f"ixc_engine._core is stale (version {version}, need {HOST_CORE_VERSION}); rebuild it"
    return mod, None


def get_host_core(kind: str = "auto") -> HostCore:
    """The host core: ``"cpp"`` (error if unavailable), ``"python"``, or ``"auto"`` (env IXC_ENGINE_HOST, else C++
    when available with a warning-backed fallback to Python)."""
    if kind == "auto":
        kind = os.environ.get("IXC_ENGINE_HOST", "auto").strip().lower() or "auto"
        source = "env IXC_ENGINE_HOST"
    else:
        source = "kind"
    if kind not in ("auto", "cpp", "python"):
        raise ValueError(f"{source}: expected 'auto', 'cpp' or 'python', got {kind!r}")
    if kind == "python":
        return python_host_core()
    mod, why = _load_cpp()
    if mod is not None:
        return mod
    if kind == "cpp":
        raise ImportError(why)
    warnings.warn(f"{why}; using the slower pure-Python host core", RuntimeWarning, stacklevel=2)
    return python_host_core()
