"""Host core: the C++ extension `ixc_engine._core` against the pure-Python twin in `ixc_engine.engine.host`, both
against independent naive references written here, plus hand-written edge cases of the block manager."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ixc_engine.engine import host
from ixc_engine.engine.host import HOST_CORE_NAMES, HOST_CORE_VERSION, get_host_core

FORCED_PYTHON = os.environ.get("IXC_ENGINE_HOST", "").strip().lower() == "python"
MASK = (1 << 64) - 1


def _cpp_core():
    if FORCED_PYTHON:
        pytest.skip("IXC_ENGINE_HOST=python: the compiled host core is deliberately not used")
    return importlib.import_module("ixc_engine._core")  # a broken build must fail here, not skip


@pytest.fixture(scope="module")
def cpp():
    return _cpp_core()


@pytest.fixture(scope="module")
def py():
    return host.python_host_core()


@pytest.fixture(params=["cpp", "python"], scope="module")
def core(request):
    return _cpp_core() if request.param == "cpp" else host.python_host_core()


# --------------------------------------------------------------------------------------------- build + selector


def test_extension_is_built_and_current():
    core = _cpp_core()
    assert core.IMPLEMENTATION == "cpp"
    assert core.HOST_CORE_VERSION == HOST_CORE_VERSION
    assert Path(core.__file__).suffix in (".so", ".pyd")
    for name in HOST_CORE_NAMES:
        assert hasattr(core, name), name
        assert hasattr(host.python_host_core(), name), name


def test_selector(monkeypatch):
    monkeypatch.delenv("IXC_ENGINE_HOST", raising=False)
    assert get_host_core("python").IMPLEMENTATION == "python"
    if not FORCED_PYTHON:
        assert get_host_core().IMPLEMENTATION == "cpp"
        assert get_host_core("cpp").IMPLEMENTATION == "cpp"
    monkeypatch.setenv("IXC_ENGINE_HOST", "python")
    assert get_host_core().IMPLEMENTATION == "python"
    monkeypatch.setenv("IXC_ENGINE_HOST", "gpu")
    with pytest.raises(ValueError, match="IXC_ENGINE_HOST"):
        get_host_core()
    with pytest.raises(ValueError, match="kind"):
        get_host_core("fast")
    # an unimportable extension: auto falls back with a warning, cpp errors
    monkeypatch.delenv("IXC_ENGINE_HOST")
    monkeypatch.setitem(sys.modules, "ixc_engine._core", None)
    with pytest.warns(RuntimeWarning, match="pure-Python"):
        assert get_host_core().IMPLEMENTATION == "python"
    with pytest.raises(ImportError, match="not importable"):
        get_host_core("cpp")
    monkeypatch.setenv("IXC_ENGINE_HOST", "cpp")
    with pytest.raises(ImportError):
        get_host_core()


def test_selector_refuses_stale_extension(monkeypatch):
    stale = type(sys)("ixc_engine._core")
    stale.HOST_CORE_VERSION = HOST_CORE_VERSION - 1
    monkeypatch.setitem(sys.modules, "ixc_engine._core", stale)
    with pytest.raises(ImportError, match="stale"):
        get_host_core("cpp")


def _setup_module():
    spec = importlib.util.spec_from_file_location("ixc_setup", Path(__file__).resolve().parents[1] / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines helpers, runs no build
    return mod


def test_setup_cuda_arch_parsing():
    mod = _setup_module()
    assert mod.cuda_gencode_flags("90;90a") == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    assert mod.cuda_gencode_flags("8.0 9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    for bad in ("", "hopper", "9"):
        with pytest.raises(ValueError):
            mod.cuda_gencode_flags(bad)


def test_setup_cuda_hook(tmp_path, monkeypatch, capsys):
    mod = _setup_module()
    monkeypatch.chdir(tmp_path)
    assert mod.cuda_extension() is None  # no csrc/cuda/*.cu: nothing to do, nothing said
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k() {}\n")
    monkeypatch.delenv("IXC_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert mod.cuda_extension() is None  # no arch list (and here no CUDA torch either): skipped with a note
    assert "skipping csrc/cuda" in capsys.readouterr().err
    assert [e.name for e in mod.ext_modules()] == ["ixc_engine._core"]


# --------------------------------------------------------------------------------------------- block hashes


def _mix_ref(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
    return z ^ (z >> 31)


def _hashes_ref(keys, bs: int, seed: int = 0) -> list[int]:
    """Scalar transcription of the documented definition, one key at a time."""
    out, h = [], seed
    for i in range(len(keys) // bs):
        d = 0x243F6A8885A308D3
        for k in keys[i * bs : (i + 1) * bs]:
            d = _mix_ref(d ^ ((int(k) & MASK) * 0x9E3779B97F4A7C15 + 0xD1B54A32D192ED03 & MASK))
        h = _mix_ref((h * 0xC2B2AE3D27D4EB4F & MASK) ^ d)
        out.append(h)
    return out


@pytest.mark.parametrize("bs", [1, 2, 3, 7, 16, 33])
def test_block_hashes_match_reference_and_each_other(cpp, py, bs):
    rng = np.random.default_rng(bs)
    for trial in range(4):
        n = int(rng.integers(0, 12 * bs + 5))
        if trial % 2:
            keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
        else:
            keys = rng.integers(0, 92544, n).astype(np.int64)
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        ref = _hashes_ref(keys.tolist(), bs, seed)
        for impl in (cpp, py):
            got = impl.block_hashes(keys, bs, seed)
            assert got.dtype == np.uint64 and got.shape == (n // bs,)
            assert got.tolist() == ref


def test_block_hashes_dtypes_agree(cpp, py):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 2**64, 64, dtype=np.uint64)
    as_signed = big.view(np.int64)
    for impl in (cpp, py):
        np.testing.assert_array_equal(impl.block_hashes(big, 8), impl.block_hashes(as_signed, 8))
        small = np.array([-1, 5, 7, -300], dtype=np.int32)
        np.testing.assert_array_equal(impl.block_hashes(small, 2), impl.block_hashes(small.astype(np.int64), 2))
        np.testing.assert_array_equal(impl.block_hashes([1, 2, 3, 4], 2), impl.block_hashes(np.arange(1, 5), 2))
        assert impl.block_hashes([], 4).shape == (0,)
    np.testing.assert_array_equal(cpp.block_hashes(big, 8), py.block_hashes(big, 8))


def test_block_hashes_pinned_values(core):
    # Pinned so a change of the hash definition is noticed (cached prefixes across versions must agree).
    assert core.block_hashes(np.arange(8), 4).tolist() == [0xE3FD4FF1E9D580A2, 0x7D75E2DEE84D8BA0]
    assert core.block_hashes([0], 1, seed=1).tolist() == [0xBED45C8869795EEE]


def test_block_hashes_chain_properties(core):
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 50000, 16 * 20 + 5)
    h = core.block_hashes(keys, 16)
    assert len(h) == 20 and len(set(h.tolist())) == 20
    np.testing.assert_array_equal(core.block_hashes(keys[: 16 * 7 + 3], 16), h[:7])  # prefix property
    changed = keys.copy()
    changed[16 * 9 + 4] += 1
    h2 = core.block_hashes(changed, 16)
    np.testing.assert_array_equal(h2[:9], h[:9])
    assert (h2[9:] != h[9:]).all()
    swapped = keys.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert core.block_hashes(swapped, 16)[0] != h[0]  # order-sensitive within a block
    assert (core.block_hashes(keys, 16, seed=7) != h).all()
    # the same block content after different prefixes hashes differently
    rep = np.tile(keys[:16], 3)
    assert len(set(core.block_hashes(rep, 16).tolist())) == 3


def test_block_hashes_mix_well(core):
    rng = np.random.default_rng(3)
    flips = []
    for _ in range(300):
        keys = rng.integers(0, 2**62, 8)
        base = int(core.block_hashes(keys, 8)[0])
        keys[rng.integers(8)] ^= 1 << int(rng.integers(62))
        flips.append((base ^ int(core.block_hashes(keys, 8)[0])).bit_count())
    assert 30 < np.mean(flips) < 34 and min(flips) > 10
    many = core.block_hashes(rng.integers(0, 8, 4 * 20000), 1)  # tiny alphabet: 80k chained blocks
    assert len(np.unique(many)) == len(many)


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((np.arange(4), 0), ValueError),
        ((np.arange(4.0), 2), TypeError),
        ((np.arange(4).reshape(2, 2), 2), ValueError),
        ((np.arange(4), 2, -1), ValueError),
        ((np.arange(4), 2, 1 << 64), ValueError),
    ],
)
def test_block_hashes_errors(core, args, exc):
    with pytest.raises(exc):
        core.block_hashes(*args)


# --------------------------------------------------------------------------------------------- pack_varlen


def test_pack_varlen_random(cpp, py):
    rng = np.random.default_rng(4)
    for _ in range(20):
        b = int(rng.integers(0, 9))
        q = rng.integers(0, 40, b).astype(np.int32)
        s = rng.integers(0, 1000, b).astype(np.int32)
        cu_ref = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
        pos_ref = [s[i] + j for i in range(b) for j in range(q[i])]
        for impl in (cpp, py):
            cu, pos = impl.pack_varlen(q, s)
            assert cu.dtype == np.int32 and pos.dtype == np.int64
            np.testing.assert_array_equal(cu, cu_ref)
            assert pos.tolist() == pos_ref


@pytest.mark.parametrize(
    ("q", "s", "exc"),
    [
        ([1, 2], [0], ValueError),
        ([1, -2], [0, 0], ValueError),
        ([1, 2], [0, -1], ValueError),
        ([1.0], [0], TypeError),
        ([[1]], [[0]], ValueError),
        ([2**31], [0], ValueError),
    ],
)
def test_pack_varlen_errors(core, q, s, exc):
    with pytest.raises(exc):
        core.pack_varlen(q, s)


# --------------------------------------------------------------------------------------------- slot mapping


def _slots_ref(tables, start, q, bs):
    return [tables[b][p // bs] * bs + p % bs for b in range(len(q)) for p in range(start[b], start[b] + q[b])]


def test_slot_mapping_and_block_table_random(cpp, py):
    rng = np.random.default_rng(5)
    for trial in range(20):
        bs = int(rng.choice([1, 3, 16, 17]))
        b = int(rng.integers(0, 7))
        start = rng.integers(0, 60, b)
        q = rng.integers(0, 50, b)
        q[rng.random(b) < 0.2] = 0
        tables = [
            rng.permutation(1000)[: (start[i] + q[i] + bs - 1) // bs + int(rng.integers(0, 3))].tolist()
            for i in range(b)
        ]
        ref = _slots_ref(tables, start.tolist(), q.tolist(), bs)
        width = max((len(t) for t in tables), default=0)
        table_ref = np.zeros((b, width), np.int32)
        for i, t in enumerate(tables):
            table_ref[i, : len(t)] = t
        for impl in (cpp, py):
            variants = [tables, [np.asarray(t, dtype=np.int32) for t in tables], [tuple(t) for t in tables]]
            for tv in variants:
                got = impl.build_slot_mapping(tv, start.astype(np.int32), q.astype(np.int32), bs)
                assert got.dtype == np.int64 and got.tolist() == ref
                arr = impl.block_table_array(tv)
                assert arr.dtype == np.int32
                np.testing.assert_array_equal(arr, table_ref)
            np.testing.assert_array_equal(impl.build_slot_mapping(table_ref, start, q, bs), ref)
            padded = impl.block_table_array(tables, width + 3)
            assert padded.shape == (b, width + 3) and not padded[:, width:].any()


def test_slot_mapping_errors(core):
    with pytest.raises(ValueError, match="block_tables\\[1\\]"):
        core.build_slot_mapping([[0, 1], [2]], [0, 15], [20, 2], 16)  # second needs blocks 0 and 1
    np.testing.assert_array_equal(core.build_slot_mapping([[0, 1], [2]], [0, 15], [20, 1], 16)[-1], 2 * 16 + 15)
    np.testing.assert_array_equal(core.build_slot_mapping([[]], [40], [0], 16), np.zeros(0))
    with pytest.raises(ValueError):
        core.build_slot_mapping([[0], [1]], [0], [1, 1], 16)
    with pytest.raises(ValueError):
        core.build_slot_mapping([[-3]], [0], [1], 16)
    with pytest.raises(ValueError):
        core.build_slot_mapping([[0]], [0], [1], 0)
    with pytest.raises(TypeError):
        core.build_slot_mapping([[0.5]], [0], [1], 16)
    with pytest.raises(ValueError):
        core.block_table_array([[1, 2, 3]], 2)
    with pytest.raises(ValueError):
        core.block_table_array([[1, -2]])
    with pytest.raises(ValueError):
        core.block_table_array([[2**31]])
    assert core.block_table_array([]).shape == (0, 0)
    assert core.block_table_array([[], []], None).shape == (2, 0)


# --------------------------------------------------------------------------------------------- plan_batches


def _plan_ref(n, budget, max_seqs):
    batches, i = [], 0
    while i < len(n):
        j, total = i, 0
        while j < len(n) and j - i < max_seqs and (j == i or total + n[j] <= budget):
            total += n[j]
            j += 1
        batches.append(list(range(i, j)))
        i = j
    return batches


def test_plan_batches_random(cpp, py):
    rng = np.random.default_rng(6)
    for _ in range(40):
        n = rng.integers(0, 3000, int(rng.integers(0, 60)))
        budget, max_seqs = int(rng.integers(1, 8000)), int(rng.integers(1, 12))
        ref = _plan_ref(n.tolist(), budget, max_seqs)
        for impl in (cpp, py):
            got = impl.plan_batches(n, budget, max_seqs)
            assert all(g.dtype == np.int32 for g in got)
            assert [g.tolist() for g in got] == ref
            for g in got:
                assert len(g) <= max_seqs and (len(g) == 1 or n[g].sum() <= budget)


def test_plan_batches_edges(core):
    assert core.plan_batches([], 10, 2) == []
    assert [b.tolist() for b in core.plan_batches([5, 50, 5, 5, 5], 12, 8)] == [[0], [1], [2, 3], [4]]
    assert [b.tolist() for b in core.plan_batches([0, 0, 0], 1, 2)] == [[0, 1], [2]]
    assert [b.tolist() for b in core.plan_batches([4, 4], 8, 8)] == [[0, 1]]
    for args in (([1], 0, 1), ([1], 1, 0), ([-1], 1, 1)):
        with pytest.raises(ValueError):
            core.plan_batches(*args)
    with pytest.raises(TypeError):
        core.plan_batches([1.5], 4, 1)


# --------------------------------------------------------------------------------------------- block manager


def _state(bm):
    return (bm.num_free(), bm.num_cached(), bm.num_evictable(), [bm.ref_count(b) for b in range(bm.num_blocks)])


def test_block_manager_basic_and_fifo_free_list(core):
    bm = core.BlockManager(6, 16)
    assert (bm.num_blocks, bm.block_size) == (6, 16)
    assert bm.allocate(0) == []
    assert bm.allocate(3) == [0, 1, 2]
    assert bm.num_free() == 3 and bm.can_allocate(3) and not bm.can_allocate(4)
    bm.release([1, 0])
    assert bm.allocate(4) == [3, 4, 5, 1]  # FIFO: untouched blocks first, then released in release order
    assert [bm.ref_count(b) for b in range(6)] == [0, 1, 1, 1, 1, 1]
    assert bm.num_cached() == 0 and bm.num_evictable() == 0


def test_block_manager_lru_eviction_order(core):
    bm = core.BlockManager(4, 2)
    blocks = bm.allocate(4)
    for b in blocks:
        assert bm.register(b, 100 + b)
    bm.release([2])
    bm.release([0, 3])
    bm.release([1])
    assert bm.num_free() == 4 and bm.num_cached() == 4 and bm.num_evictable() == 4
    assert bm.allocate(2) == [2, 0]  # least recently released first
    assert bm.num_cached() == 2
    assert bm.match_prefix([102]) == []  # evicted hash left the index
    assert bm.match_prefix([103, 101]) == [3, 1]  # matched cached blocks leave the LRU list
    assert bm.num_evictable() == 0 and bm.num_free() == 0
    bm.release([1])
    bm.release([3])
    assert bm.allocate(1) == [1]


def test_block_manager_allocate_all_or_nothing(core):
    bm = core.BlockManager(5, 4)
    held = bm.allocate(3)
    bm.register(held[0], 9)
    bm.release([held[0]])
    before = _state(bm)
    with pytest.raises(MemoryError, match=r"cannot allocate 4 blocks: only 3 available \(2 free \+ 1 evictable"):
        bm.allocate(4)
    assert _state(bm) == before
    assert bm.match_prefix([9]) == [held[0]]  # still indexed
    with pytest.raises(ValueError):
        bm.allocate(-1)


def test_block_manager_release_errors_are_atomic(core):
    bm = core.BlockManager(4, 4)
    a = bm.allocate(2)
    bm.release([a[0]])
    before = _state(bm)
    with pytest.raises(ValueError, match="not allocated"):
        bm.release([a[1], a[0]])  # double release of a[0]
    assert _state(bm) == before and bm.ref_count(a[1]) == 1
    with pytest.raises(ValueError, match="not allocated"):
        bm.release([a[1], a[1]])
    assert _state(bm) == before
    for bad in ([4], [-1]):
        with pytest.raises(ValueError, match="outside"):
            bm.release(bad)
    with pytest.raises(TypeError):
        bm.release([0.5])
    with pytest.raises(ValueError):
        bm.ref_count(4)
    bm.release(np.array([a[1]], dtype=np.int32))
    assert bm.num_free() == 4


def test_block_manager_match_stops_at_first_miss(core):
    bm = core.BlockManager(8, 4)
    blocks = bm.allocate(4)
    for b, h in zip(blocks, [11, 12, 13, 14]):
        bm.register(b, h)
    assert bm.match_prefix([11, 12, 99, 14]) == blocks[:2]
    assert bm.match_prefix([99, 11]) == []
    assert bm.match_prefix(np.array([11, 12, 13, 14, 15], dtype=np.uint64)) == blocks
    assert [bm.ref_count(b) for b in blocks] == [3, 3, 2, 2]
    assert bm.match_prefix([]) == []


def test_block_manager_shared_block_not_evicted_while_referenced(core):
    bm = core.BlockManager(3, 4)
    (shared,) = bm.allocate(1)
    bm.register(shared, 77)
    assert bm.match_prefix([77]) == [shared]  # a second sequence shares it
    bm.release([shared])  # first sequence done
    assert bm.ref_count(shared) == 1 and bm.num_evictable() == 0
    assert sorted(bm.allocate(2)) == sorted({0, 1, 2} - {shared})
    with pytest.raises(MemoryError):
        bm.allocate(1)
    assert bm.match_prefix([77]) == [shared]
    bm.release([shared, shared])
    assert bm.num_evictable() == 1
    assert bm.allocate(1) == [shared]  # now evictable, and evicted
    assert bm.match_prefix([77]) == []


def test_block_manager_register_rules(core):
    bm = core.BlockManager(4, 4)
    a, b = bm.allocate(2)
    assert bm.register(a, 5) is True
    assert bm.register(a, 5) is True  # idempotent
    assert bm.register(b, 5) is False  # content already cached in a: keep a
    with pytest.raises(ValueError, match="another hash"):
        bm.register(a, 6)
    with pytest.raises(ValueError, match="not allocated"):
        bm.register(3, 7)
    with pytest.raises(ValueError):
        bm.register(4, 7)
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            bm.register(b, bad)
    assert bm.register(b, np.uint64(2**64 - 1)) is True
    bm.release([b])  # indexed -> cached, not free
    assert bm.num_evictable() == 1 and bm.match_prefix([2**64 - 1]) == [b]
    assert bm.num_cached() == 2
    with pytest.raises(ValueError):
        bm.match_prefix([-5])
    with pytest.raises(ValueError):
        bm.match_prefix(np.array([3, -5]))
    with pytest.raises(TypeError):
        bm.match_prefix([1.5])


def test_block_manager_register_blocks(core):
    bm = core.BlockManager(6, 4)
    a = bm.allocate(4)
    assert bm.register_blocks(a[:3], np.array([1, 2, 1], dtype=np.uint64)) == [True, True, False]
    assert bm.register_blocks([], []) == []
    with pytest.raises(ValueError, match="lengths differ"):
        bm.register_blocks(a, [5])
    with pytest.raises(ValueError, match="not allocated"):
        bm.register_blocks([a[3], 5], [8, 9])  # the pair before the bad one stays registered
    assert bm.num_cached() == 3 and bm.match_prefix([1, 2, 8]) == [a[0], a[1], a[3]]


def test_block_manager_index_churn(cpp, py):
    """Many evictions and re-registrations through a small, crowded prefix index."""
    rng = np.random.default_rng(11)
    for n in (1, 8, 13, 64):
        bms = [impl.BlockManager(n, 16) for impl in (cpp, py)]
        pool = rng.integers(0, 2**64, 4 * n, dtype=np.uint64)
        for _ in range(150):
            k = int(rng.integers(1, n + 1))
            hs = pool[rng.integers(0, len(pool), k)]
            order = rng.permutation(k)
            probe_hash = pool[rng.integers(0, len(pool), 1)]
            results = []
            for bm in bms:
                blocks = bm.allocate(k)
                results.append((blocks, bm.register_blocks(blocks, hs)))
                bm.release([blocks[i] for i in order])
                probe = bm.match_prefix(probe_hash)
                results.append((probe, _state(bm)))
                bm.release(probe)
            assert results[:2] == results[2:]
        # every indexed hash is matchable and maps to a distinct block
        found = [bms[0].match_prefix([h]) for h in pool.tolist()]
        hits = [f[0] for f in found if f]
        assert len(hits) == bms[0].num_cached() == len(set(hits))


@pytest.mark.parametrize("args", [(0, 16), (4, 0), (-1, 4)])
def test_block_manager_bad_construction(core, args):
    with pytest.raises(ValueError):
        core.BlockManager(*args)


def _call(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the exception type is the compared result
        return ("err", type(exc).__name__)


@pytest.mark.parametrize("seed", range(6))
def test_block_manager_random_ops_identical(cpp, py, seed):
    rng = np.random.default_rng(seed)
    n_blocks = int(rng.integers(4, 40))
    a, b = cpp.BlockManager(n_blocks, 16), py.BlockManager(n_blocks, 16)
    hash_pool = [int(x) for x in rng.integers(0, 2**64, 3 * n_blocks, dtype=np.uint64)]
    held: list[list[int]] = []  # block lists owned by live "sequences"
    dead: list[list[int]] = []
    for _ in range(1500):
        op = int(rng.integers(0, 8))
        if op == 0:
            start = int(rng.integers(0, len(hash_pool)))
            hs = hash_pool[start : start + int(rng.integers(0, 6))]
            args = (np.array(hs, dtype=np.uint64) if rng.random() < 0.5 else hs,)
            ra, rb = _call(a.match_prefix, *args), _call(b.match_prefix, *args)
        elif op == 1:
            args = (int(rng.integers(0, n_blocks // 2 + 3)),)
            ra, rb = _call(a.allocate, *args), _call(b.allocate, *args)
        elif op == 2 and held:
            seq = held[int(rng.integers(len(held)))]
            blk = seq[int(rng.integers(len(seq)))] if seq and rng.random() < 0.9 else int(rng.integers(n_blocks))
            args = (blk, hash_pool[int(rng.integers(len(hash_pool)))])
            ra, rb = _call(a.register, *args), _call(b.register, *args)
        elif op == 3 and held:
            seq = held.pop(int(rng.integers(len(held))))
            args = (seq[::-1] if rng.random() < 0.5 else seq,)
            ra, rb = _call(a.release, *args), _call(b.release, *args)
            dead.append(seq)
        elif op == 4 and dead:
            args = (dead[int(rng.integers(len(dead)))] + [int(rng.integers(-2, n_blocks + 2))],)
            ra, rb = _call(a.release, *args), _call(b.release, *args)  # mostly double releases
            assert ra == rb
            continue
        elif op == 6 and held:
            seq = held[int(rng.integers(len(held)))]
            hs = [hash_pool[int(i)] for i in rng.integers(0, len(hash_pool), len(seq))]
            args = (np.array(seq, dtype=np.int64), np.array(hs, dtype=np.uint64)) if rng.random() < 0.5 else (seq, hs)
            ra, rb = _call(a.register_blocks, *args), _call(b.register_blocks, *args)
        elif op == 5:
            args = (int(rng.integers(-1, n_blocks + 1)),)
            assert _call(a.ref_count, *args) == _call(b.ref_count, *args)
            assert _call(a.can_allocate, *args) == _call(b.can_allocate, *args)
            continue
        else:
            continue
        assert ra == rb, (op, args)
        if op in (0, 1) and ra[0] == "ok" and ra[1]:
            held.append(ra[1])
        state = _state(a)
        assert state == _state(b)
        # independent invariant: every block is either handed out or available
        assert state[0] + sum(r > 0 for r in state[3]) == n_blocks
        assert state[2] <= state[1]


def test_engine_like_step_identical(cpp, py):
    """Hashes -> match -> allocate -> slot mapping -> register -> release, twice; the second pass hits the cache."""
    rng = np.random.default_rng(7)
    bs = 16
    shared = rng.integers(0, 90000, 200)
    seqs = [np.concatenate([shared, rng.integers(0, 90000, int(rng.integers(1, 100)))]) for _ in range(6)]
    results = {}
    for impl in (cpp, py):
        bm = impl.BlockManager(64, bs)
        log = []
        for _ in range(2):
            tables, starts, qs = [], [], []
            for keys in seqs:
                h = impl.block_hashes(keys, bs)
                matched = bm.match_prefix(h[: (len(keys) - 1) // bs])
                need = (len(keys) + bs - 1) // bs - len(matched)
                table = matched + bm.allocate(need)
                for i in range(len(matched), len(h)):
                    bm.register(table[i], h[i])
                tables.append(table)
                starts.append(len(matched) * bs)
                qs.append(len(keys) - len(matched) * bs)
            cu, pos = impl.pack_varlen(np.array(qs, np.int32), np.array(starts, np.int32))
            slots = impl.build_slot_mapping(tables, np.array(starts, np.int32), np.array(qs, np.int32), bs)
            bt = impl.block_table_array(tables)
            log.append((cu.tolist(), pos.tolist(), slots.tolist(), bt.tolist(), _state(bm)))
            assert len(set(slots.tolist())) == len(slots)  # no two new tokens share a KV slot
            for t in tables:
                bm.release(t[::-1])
        assert log[1][0][-1] < log[0][0][-1] // 2  # the cached prefix is reused
        results[impl.IMPLEMENTATION] = log
    assert results["cpp"] == results["python"]
