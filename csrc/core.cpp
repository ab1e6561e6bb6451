// ixc_engine._core: the host-side hot path of the engine (no libtorch, numpy arrays in/out).
//
// Every function here has a pure-Python twin in ixc_engine/engine/host.py with identical results
// (tests/test_host_core.py drives both with the same random workloads). Change both or neither.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace ixc {

// Bumped whenever the semantics of anything below change; host.py refuses a stale build.
constexpr int kHostCoreVersion = 1;

// ---------------------------------------------------------------------------------------------
// Block content hash (see host.py `block_hashes` for the same definition in Python):
//   mix(z)   = splitmix64 finalizer: z ^= z>>30; z *= B1; z ^= z>>27; z *= B2; z ^= z>>31
//   digest_i = fold over the keys k_0..k_{bs-1} of block i, d = D0; d = mix(d ^ (k_j * M1 + C1))
//   h_i      = mix((h_{i-1} * M2) ^ digest_i),  h_{-1} = seed
// all arithmetic mod 2^64, keys reinterpreted as uint64 (two's complement). mix is a bijection, so
// the fold is order-sensitive; the additive C1 keeps key 0 from mapping to the fixed point mix(0) = 0.
constexpr uint64_t kMixB1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMixB2 = 0x94D049BB133111EBULL;
constexpr uint64_t kKeyMul = 0x9E3779B97F4A7C15ULL;     // M1: 2^64 / golden ratio (odd)
constexpr uint64_t kKeyAdd = 0xD1B54A32D192ED03ULL;     // C1
constexpr uint64_t kDigestInit = 0x243F6A8885A308D3ULL;  // D0: fractional digits of pi
constexpr uint64_t kChainMul = 0xC2B2AE3D27D4EB4FULL;    // M2 (odd)

inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= kMixB1;
  z ^= z >> 27;
  z *= kMixB2;
  z ^= z >> 31;
  return z;
}

struct OutOfBlocks : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// Argument conversion. Rules (mirrored in host.py): array-likes go through numpy; a non-empty one must
// have an integer dtype (TypeError) and be 1-D (ValueError); an empty one may have any dtype because
// np.asarray([]) is float64.

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

py::array as_int_array(py::handle obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) {
    throw py::type_error(std::string(name) + ": expected an integer array-like");
  }
  const char kind = arr.dtype().kind();
  if (arr.size() > 0 && kind != 'i' && kind != 'u') {
    throw py::type_error(std::string(name) + ": expected an integer dtype, got " +
                         py::str(arr.dtype()).cast<std::string>());
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(name) + ": expected a 1-D array, got " + std::to_string(arr.ndim()) +
                          " dimensions");
  }
  return arr;
}

I64Array int_array_1d(py::handle obj, const char* name) { return I64Array::ensure(as_int_array(obj, name)); }

int64_t to_index(py::handle item, const char* name) {
  if (PyLong_CheckExact(item.ptr())) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(item.ptr(), &overflow);
    if (overflow != 0) throw py::value_error(std::string(name) + ": integer out of int64 range");
    return static_cast<int64_t>(v);
  }
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
  if (!idx) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + ": expected integers, got " +
                         py::str(py::type::handle_of(item)).cast<std::string>());
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (overflow != 0) {
    throw py::value_error(std::string(name) + ": integer out of int64 range");
  }
  return static_cast<int64_t>(v);
}

uint64_t to_hash(py::handle item, const char* name) {
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
  if (!idx) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + ": expected integers, got " +
                         py::str(py::type::handle_of(item)).cast<std::string>());
  }
  const unsigned long long v = PyLong_AsUnsignedLongLong(idx.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string(name) + ": hashes must lie in [0, 2**64), got " +
                          py::str(idx).cast<std::string>());
  }
  return static_cast<uint64_t>(v);
}

// A numpy array (integer dtype; a signed one must be non-negative) or any iterable of integers in [0, 2**64).
std::vector<uint64_t> hash_list(py::handle obj, const char* name) {
  std::vector<uint64_t> out;
  if (py::isinstance<py::array>(obj)) {
    py::array arr = as_int_array(obj, name);
    if (arr.size() > 0 && arr.dtype().kind() == 'i') {
      I64Array a = I64Array::ensure(arr);
      for (py::ssize_t i = 0; i < a.size(); ++i) {
        if (a.data()[i] < 0) {
          throw py::value_error(std::string(name) + ": hashes must lie in [0, 2**64), got " +
                                std::to_string(a.data()[i]));
        }
      }
    }
    U64Array a = U64Array::ensure(arr);
    out.assign(a.data(), a.data() + a.size());
    return out;
  }
  for (py::handle item : py::iter(obj)) {
    out.push_back(to_hash(item, name));
  }
  return out;
}

// A numpy array (integer dtype) or any iterable of integers.
std::vector<int64_t> index_list(py::handle obj, const char* name) {
  std::vector<int64_t> out;
  if (py::isinstance<py::array>(obj)) {
    I64Array a = int_array_1d(obj, name);
    out.assign(a.data(), a.data() + a.size());
    return out;
  }
  for (py::handle item : py::iter(obj)) {
    out.push_back(to_index(item, name));
  }
  return out;
}

// Read-only view of one block table: a numpy array or a Python sequence of ints, read lazily.
class TableView {
 public:
  TableView(py::handle obj, const char* name) : name_(name) {
    if (py::isinstance<py::array>(obj)) {
      arr_ = int_array_1d(obj, name);
      data_ = arr_.data();
      size_ = arr_.size();
    } else {
      seq_ = py::reinterpret_steal<py::object>(PySequence_Fast(obj.ptr(), "block table must be a sequence"));
      if (!seq_) {
        PyErr_Clear();
        throw py::type_error(std::string(name) + ": each block table must be a sequence or array of ints");
      }
      size_ = PySequence_Fast_GET_SIZE(seq_.ptr());
    }
  }
  py::ssize_t size() const { return size_; }
  int64_t operator[](py::ssize_t i) const {
    if (data_ != nullptr) {
      return data_[i];
    }
    return to_index(PySequence_Fast_GET_ITEM(seq_.ptr(), i), name_);
  }

 private:
  const char* name_;
  I64Array arr_;
  py::object seq_;
  const int64_t* data_ = nullptr;
  py::ssize_t size_ = 0;
};

std::vector<TableView> table_views(py::handle tables, const char* name) {
  std::vector<TableView> views;
  if (py::isinstance<py::array>(tables)) {
    py::array arr = py::array::ensure(tables);
    if (arr.ndim() != 2) {
      throw py::value_error(std::string(name) + ": a block-table array must be 2-D, got " +
                            std::to_string(arr.ndim()) + " dimensions");
    }
  }
  for (py::handle row : py::iter(tables)) {
    views.emplace_back(row, name);
  }
  return views;
}

// ---------------------------------------------------------------------------------------------

py::tuple pack_varlen(py::handle q_lens_obj, py::handle start_pos_obj) {
  I64Array q_lens = int_array_1d(q_lens_obj, "q_lens");
  I64Array start_pos = int_array_1d(start_pos_obj, "start_pos");
  const py::ssize_t B = q_lens.size();
  if (start_pos.size() != B) {
    throw py::value_error("start_pos: length " + std::to_string(start_pos.size()) + " != len(q_lens) " +
                          std::to_string(B));
  }
  const int64_t* q = q_lens.data();
  const int64_t* s = start_pos.data();
  int64_t total = 0;
  for (py::ssize_t b = 0; b < B; ++b) {
    if (q[b] < 0) throw py::value_error("q_lens: entries must be >= 0, got " + std::to_string(q[b]));
    if (s[b] < 0) throw py::value_error("start_pos: entries must be >= 0, got " + std::to_string(s[b]));
    total += q[b];
    if (total > std::numeric_limits<int32_t>::max()) {
      throw py::value_error("q_lens: total token count does not fit int32 cu_seqlens");
    }
  }
  py::array_t<int32_t> cu(B + 1);
  py::array_t<int64_t> positions(total);
  int32_t* c = cu.mutable_data();
  int64_t* p = positions.mutable_data();
  c[0] = 0;
  int64_t t = 0;
  for (py::ssize_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < q[b]; ++j) p[t++] = s[b] + j;
    c[b + 1] = static_cast<int32_t>(t);
  }
  return py::make_tuple(cu, positions);
}

py::array_t<uint64_t> block_hashes(py::handle keys_obj, int64_t block_size, py::handle seed_obj) {
  if (block_size < 1) throw py::value_error("block_size: must be >= 1, got " + std::to_string(block_size));
  const uint64_t seed = to_hash(seed_obj, "seed");
  py::array arr = as_int_array(keys_obj, "keys");
  // Both casts reinterpret two's complement, matching numpy's astype(uint64) in the Python twin.
  U64Array keys = (arr.dtype().kind() == 'u') ? U64Array::ensure(arr) : U64Array::ensure(I64Array::ensure(arr));
  const py::ssize_t nb = keys.size() / block_size;
  py::array_t<uint64_t> out(nb);
  const uint64_t* k = keys.data();
  uint64_t* o = out.mutable_data();
  // Digests of different blocks are independent: fold 4 blocks at once so their multiply chains overlap.
  py::ssize_t i = 0;
  for (; i + 4 <= nb; i += 4) {
    uint64_t d0 = kDigestInit, d1 = kDigestInit, d2 = kDigestInit, d3 = kDigestInit;
    const uint64_t* kb = k + i * block_size;
    for (int64_t j = 0; j < block_size; ++j) {
      d0 = mix64(d0 ^ (kb[j] * kKeyMul + kKeyAdd));
      d1 = mix64(d1 ^ (kb[j + block_size] * kKeyMul + kKeyAdd));
      d2 = mix64(d2 ^ (kb[j + 2 * block_size] * kKeyMul + kKeyAdd));
      d3 = mix64(d3 ^ (kb[j + 3 * block_size] * kKeyMul + kKeyAdd));
    }
    o[i] = d0;
    o[i + 1] = d1;
    o[i + 2] = d2;
    o[i + 3] = d3;
  }
  for (; i < nb; ++i) {
    uint64_t d = kDigestInit;
    const uint64_t* kb = k + i * block_size;
    for (int64_t j = 0; j < block_size; ++j) d = mix64(d ^ (kb[j] * kKeyMul + kKeyAdd));
    o[i] = d;
  }
  uint64_t h = seed;
  for (i = 0; i < nb; ++i) {
    h = mix64((h * kChainMul) ^ o[i]);
    o[i] = h;
  }
  return out;
}

py::array_t<int64_t> build_slot_mapping(py::handle tables_obj, py::handle start_pos_obj, py::handle q_lens_obj,
                                        int64_t block_size) {
  if (block_size < 1) throw py::value_error("block_size: must be >= 1, got " + std::to_string(block_size));
  std::vector<TableView> tables = table_views(tables_obj, "block_tables");
  I64Array start_pos = int_array_1d(start_pos_obj, "start_pos");
  I64Array q_lens = int_array_1d(q_lens_obj, "q_lens");
  const py::ssize_t B = static_cast<py::ssize_t>(tables.size());
  if (start_pos.size() != B || q_lens.size() != B) {
    throw py::value_error("block_tables, start_pos, q_lens: lengths differ (" + std::to_string(B) + ", " +
                          std::to_string(start_pos.size()) + ", " + std::to_string(q_lens.size()) + ")");
  }
  const int64_t* s = start_pos.data();
  const int64_t* q = q_lens.data();
  int64_t total = 0;
  for (py::ssize_t b = 0; b < B; ++b) {
    if (q[b] < 0) throw py::value_error("q_lens: entries must be >= 0, got " + std::to_string(q[b]));
    if (s[b] < 0) throw py::value_error("start_pos: entries must be >= 0, got " + std::to_string(s[b]));
    if (q[b] > 0) {
      const int64_t need = (s[b] + q[b] + block_size - 1) / block_size;
      if (tables[b].size() < need) {
        throw py::value_error("block_tables[" + std::to_string(b) + "]: has " + std::to_string(tables[b].size()) +
                              " blocks, positions up to " + std::to_string(s[b] + q[b] - 1) + " need " +
                              std::to_string(need));
      }
    }
    total += q[b];
  }
  py::array_t<int64_t> out(total);
  int64_t* o = out.mutable_data();
  int64_t t = 0;
  for (py::ssize_t b = 0; b < B; ++b) {
    const int64_t end = s[b] + q[b];
    int64_t p = s[b];
    while (p < end) {
      const int64_t blk = tables[b][p / block_size];
      if (blk < 0) {
        throw py::value_error("block_tables[" + std::to_string(b) + "]: negative block id " + std::to_string(blk));
      }
      const int64_t stop = std::min(end, (p / block_size + 1) * block_size);
      const int64_t base = blk * block_size - (p / block_size) * block_size;
      for (; p < stop; ++p) o[t++] = base + p;
    }
  }
  return out;
}

py::array_t<int32_t> block_table_array(py::handle tables_obj, py::object max_blocks_obj) {
  std::vector<TableView> tables = table_views(tables_obj, "block_tables");
  const py::ssize_t B = static_cast<py::ssize_t>(tables.size());
  int64_t width = 0;
  for (const TableView& t : tables) width = std::max<int64_t>(width, t.size());
  if (!max_blocks_obj.is_none()) {
    const int64_t mb = to_index(max_blocks_obj, "max_blocks");
    if (mb < 0) throw py::value_error("max_blocks: must be >= 0, got " + std::to_string(mb));
    if (width > mb) {
      throw py::value_error("block_tables: a table has " + std::to_string(width) + " blocks > max_blocks " +
                            std::to_string(mb));
    }
    width = mb;
  }
  py::array_t<int32_t> out({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(width)});
  int32_t* o = out.mutable_data();
  std::fill(o, o + B * width, 0);
  for (py::ssize_t b = 0; b < B; ++b) {
    const TableView& t = tables[b];
    for (py::ssize_t i = 0; i < t.size(); ++i) {
      const int64_t v = t[i];
      if (v < 0 || v > std::numeric_limits<int32_t>::max()) {
        throw py::value_error("block_tables[" + std::to_string(b) + "]: block id " + std::to_string(v) +
                              " outside [0, 2**31)");
      }
      o[b * width + i] = static_cast<int32_t>(v);
    }
  }
  return out;
}

py::list plan_batches(py::handle n_tokens_obj, int64_t max_batch_tokens, int64_t max_seqs) {
  if (max_batch_tokens < 1) {
    throw py::value_error("max_batch_tokens: must be >= 1, got " + std::to_string(max_batch_tokens));
  }
  if (max_seqs < 1) throw py::value_error("max_seqs: must be >= 1, got " + std::to_string(max_seqs));
  I64Array n_tokens = int_array_1d(n_tokens_obj, "n_tokens");
  const int64_t* n = n_tokens.data();
  const py::ssize_t N = n_tokens.size();
  for (py::ssize_t i = 0; i < N; ++i) {
    if (n[i] < 0) throw py::value_error("n_tokens: entries must be >= 0, got " + std::to_string(n[i]));
  }
  // Greedy: close the open batch when the next item would exceed either budget; an item over the token
  // budget therefore lands alone in its own batch.
  std::vector<py::ssize_t> starts;
  int64_t sum = 0;
  int64_t count = 0;
  for (py::ssize_t i = 0; i < N; ++i) {
    if (count > 0 && (sum + n[i] > max_batch_tokens || count == max_seqs)) {
      sum = 0;
      count = 0;
    }
    if (count == 0) starts.push_back(i);
    sum += n[i];
    ++count;
  }
  starts.push_back(N);
  py::list out;
  for (size_t k = 0; k + 1 < starts.size(); ++k) {
    py::array_t<int32_t> idx(starts[k + 1] - starts[k]);
    int32_t* d = idx.mutable_data();
    for (py::ssize_t i = starts[k]; i < starts[k + 1]; ++i) d[i - starts[k]] = static_cast<int32_t>(i);
    out.append(std::move(idx));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Prefix index: open addressing with linear probing and backward-shift deletion (no tombstones), capacity a
// power of two >= 2 * max entries so probes stay short. Slot of a key = top bits of key * 2^64/phi
// (Fibonacci hashing), which also spreads structured keys.
class HashIndex {
 public:
  explicit HashIndex(size_t max_entries) {
    size_t cap = 16;
    int bits = 4;
    while (cap < 2 * max_entries) {
      cap <<= 1;
      ++bits;
    }
    slots_.assign(cap, Slot{0, -1});
    mask_ = cap - 1;
    shift_ = 64 - bits;
  }
  size_t size() const { return size_; }
  int32_t find(uint64_t key) const {
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      if (slots_[i].val < 0) return -1;
      if (slots_[i].key == key) return slots_[i].val;
    }
  }
  bool insert(uint64_t key, int32_t val) {  // false (and no change) if key is present
    size_t i = home(key);
    for (; slots_[i].val >= 0; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return false;
    }
    slots_[i] = Slot{key, val};
    ++size_;
    return true;
  }
  void erase(uint64_t key) {
    size_t i = home(key);
    while (slots_[i].key != key || slots_[i].val < 0) {
      if (slots_[i].val < 0) return;
      i = (i + 1) & mask_;
    }
    // Pull later entries of the cluster back into the hole unless their home lies cyclically in (hole, j].
    for (size_t j = (i + 1) & mask_; slots_[j].val >= 0; j = (j + 1) & mask_) {
      const size_t k = home(slots_[j].key);
      const bool stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i].val = -1;
    --size_;
  }

 private:
  struct Slot {
    uint64_t key;
    int32_t val;  // block id, -1 = empty
  };
  size_t home(uint64_t key) const { return static_cast<size_t>((key * kKeyMul) >> shift_); }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 0;
  size_t size_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Paged KV-cache block allocator with reference counts and a prefix index (hash -> block).
// Each block is in exactly one state:
//   free      ref 0, not indexed, in the FIFO free list
//   used      ref > 0 (indexed or not)
//   cached    ref 0, indexed, in the LRU list (evictable; oldest release evicted first)
class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size) : index_(checked_num_blocks(num_blocks)) {
    if (num_blocks < 1 || num_blocks >= std::numeric_limits<int32_t>::max()) {
      throw py::value_error("num_blocks: must be in [1, 2**31 - 1), got " + std::to_string(num_blocks));
    }
    if (block_size < 1) throw py::value_error("block_size: must be >= 1, got " + std::to_string(block_size));
    n_ = static_cast<int32_t>(num_blocks);
    block_size_ = block_size;
    ref_.assign(n_, 0);
    hash_.assign(n_, 0);
    indexed_.assign(n_, 0);
    prev_.assign(n_ + 1, n_);
    next_.assign(n_ + 1, n_);
    ring_.resize(n_);
    for (int32_t i = 0; i < n_; ++i) ring_[i] = i;
    free_head_ = 0;
    free_size_ = n_;
  }

  int64_t num_blocks() const { return n_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free() const { return free_size_ + lru_size_; }
  int64_t num_cached() const { return static_cast<int64_t>(index_.size()); }
  int64_t num_evictable() const { return lru_size_; }

  int64_t ref_count(int64_t block_id) const { return ref_[check_id(block_id, "block_id")]; }

  bool can_allocate(int64_t n) const {
    if (n < 0) throw py::value_error("n: must be >= 0, got " + std::to_string(n));
    return n <= num_free();
  }

  std::vector<int32_t> match_prefix(const std::vector<uint64_t>& hashes) {
    std::vector<int32_t> out;
    for (uint64_t h : hashes) {
      const int32_t b = index_.find(h);
      if (b < 0) break;
      if (ref_[b] == 0) lru_unlink(b);
      ++ref_[b];
      out.push_back(b);
    }
    return out;
  }

  std::vector<int32_t> allocate(int64_t n) {
    if (n < 0) throw py::value_error("n: must be >= 0, got " + std::to_string(n));
    if (n > num_free()) {
      throw OutOfBlocks("cannot allocate " + std::to_string(n) + " blocks: only " + std::to_string(num_free()) +
                        " available (" + std::to_string(free_size_) + " free + " + std::to_string(lru_size_) +
                        " evictable cached)");
    }
    std::vector<int32_t> out;
    out.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      int32_t b;
      if (free_size_ > 0) {
        b = ring_[free_head_];
        free_head_ = (free_head_ + 1) % n_;
        --free_size_;
      } else {
        b = next_[n_];  // LRU head: least recently released
        lru_unlink(b);
        index_.erase(hash_[b]);
        indexed_[b] = 0;
      }
      ref_[b] = 1;
      out.push_back(b);
    }
    return out;
  }

  bool register_block(int64_t block_id, uint64_t h) {
    const int32_t b = check_id(block_id, "block_id");
    if (ref_[b] == 0) {
      throw py::value_error("block_id: block " + std::to_string(b) + " is not allocated (ref count 0)");
    }
    if (indexed_[b]) {
      if (hash_[b] == h) return true;
      throw py::value_error("block_id: block " + std::to_string(b) + " is already registered with another hash");
    }
    if (!index_.insert(h, b)) return false;  // content already cached in another block: keep that one
    indexed_[b] = 1;
    hash_[b] = h;
    return true;
  }

  // Same as register_block over the pairs in order; on an error the pairs before it stay registered.
  std::vector<bool> register_blocks(const std::vector<int64_t>& ids, const std::vector<uint64_t>& hashes) {
    if (ids.size() != hashes.size()) {
      throw py::value_error("block_ids, hashes: lengths differ (" + std::to_string(ids.size()) + ", " +
                            std::to_string(hashes.size()) + ")");
    }
    std::vector<bool> out(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) out[i] = register_block(ids[i], hashes[i]);
    return out;
  }

  void release(const std::vector<int64_t>& ids) {
    // All or nothing: decrement, roll back on the first bad id; blocks reaching 0 are queued in the
    // order they reach 0.
    std::vector<int32_t> zeroed;
    for (size_t i = 0; i < ids.size(); ++i) {
      const int64_t v = ids[i];
      std::string err;
      if (v < 0 || v >= n_) {
        err = "block_ids: block id " + std::to_string(v) + " outside [0, " + std::to_string(n_) + ")";
      } else if (ref_[v] == 0) {
        err = "block_ids: block " + std::to_string(v) + " is not allocated (double release?)";
      }
      if (!err.empty()) {
        for (size_t j = 0; j < i; ++j) ++ref_[ids[j]];
        throw py::value_error(err);
      }
      if (--ref_[v] == 0) zeroed.push_back(static_cast<int32_t>(v));
    }
    for (int32_t b : zeroed) {
      if (indexed_[b]) {
        lru_push_back(b);
      } else {
        ring_[(free_head_ + free_size_) % n_] = b;
        ++free_size_;
      }
    }
  }

 private:
  static size_t checked_num_blocks(int64_t num_blocks) {
    if (num_blocks < 1 || num_blocks >= std::numeric_limits<int32_t>::max()) {
      throw py::value_error("num_blocks: must be in [1, 2**31 - 1), got " + std::to_string(num_blocks));
    }
    return static_cast<size_t>(num_blocks);
  }
  int32_t check_id(int64_t v, const char* name) const {
    if (v < 0 || v >= n_) {
      throw py::value_error(std::string(name) + ": block id " + std::to_string(v) + " outside [0, " +
                            std::to_string(n_) + ")");
    }
    return static_cast<int32_t>(v);
  }
  void lru_unlink(int32_t b) {
    next_[prev_[b]] = next_[b];
    prev_[next_[b]] = prev_[b];
    --lru_size_;
  }
  void lru_push_back(int32_t b) {
    const int32_t tail = prev_[n_];
    next_[tail] = b;
    prev_[b] = tail;
    next_[b] = n_;
    prev_[n_] = b;
    ++lru_size_;
  }

  HashIndex index_;  // first member: initialised (and num_blocks checked) before the body runs
  int32_t n_ = 0;
  int64_t block_size_ = 0;
  std::vector<int32_t> ref_;
  std::vector<uint64_t> hash_;
  std::vector<uint8_t> indexed_;
  std::vector<int32_t> ring_;  // FIFO free list as a ring buffer of capacity n_
  int64_t free_head_ = 0;
  int64_t free_size_ = 0;
  std::vector<int32_t> prev_, next_;  // intrusive LRU list; index n_ is the sentinel
  int64_t lru_size_ = 0;
};

}  // namespace ixc

PYBIND11_MODULE(_core, m) {
  using ixc::BlockManager;
  m.doc() = "ixc-engine host core (C++): varlen packing, block hashes, block manager, slot mapping, batch planning";
  m.attr("HOST_CORE_VERSION") = ixc::kHostCoreVersion;
  m.attr("IMPLEMENTATION") = "cpp";

  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ixc::OutOfBlocks& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  m.def("pack_varlen", &ixc::pack_varlen, py::arg("q_lens"), py::arg("start_pos"),
        "(q_lens[B], start_pos[B]) -> (cu_seqlens int32[B+1], positions int64[T])");
  m.def("block_hashes", &ixc::block_hashes, py::arg("keys"), py::arg("block_size"), py::arg("seed") = 0,
        "Chained 64-bit content hash of each full block of keys -> uint64[len(keys) // block_size]");
  m.def("build_slot_mapping", &ixc::build_slot_mapping, py::arg("block_tables"), py::arg("start_pos"),
        py::arg("q_lens"), py::arg("block_size"), "KV-cache slot of every new token -> int64[T]");
  m.def("block_table_array", &ixc::block_table_array, py::arg("block_tables"), py::arg("max_blocks") = py::none(),
        "Block tables padded with 0 -> int32[B, max_blocks]");
  m.def("plan_batches", &ixc::plan_batches, py::arg("n_tokens"), py::arg("max_batch_tokens"), py::arg("max_seqs"),
        "Split ordered work items into consecutive batches -> list of int32 index arrays");

  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def(
          "match_prefix",
          [](BlockManager& self, py::handle hashes) { return self.match_prefix(ixc::hash_list(hashes, "hashes")); },
          py::arg("hashes"))
      .def("allocate", &BlockManager::allocate, py::arg("n"))
      .def(
          "register",
          [](BlockManager& self, int64_t block_id, py::handle h) {
            return self.register_block(block_id, ixc::to_hash(h, "h"));
          },
          py::arg("block_id"), py::arg("h"))
      .def(
          "register_blocks",
          [](BlockManager& self, py::handle ids, py::handle hashes) {
            return self.register_blocks(ixc::index_list(ids, "block_ids"), ixc::hash_list(hashes, "hashes"));
          },
          py::arg("block_ids"), py::arg("hashes"))
      .def(
          "release",
          [](BlockManager& self, py::handle ids) { self.release(ixc::index_list(ids, "block_ids")); },
          py::arg("block_ids"))
      .def("num_free", &BlockManager::num_free)
      .def("num_cached", &BlockManager::num_cached)
      .def("num_evictable", &BlockManager::num_evictable)
      .def("ref_count", &BlockManager::ref_count, py::arg("block_id"))
      .def("can_allocate", &BlockManager::can_allocate, py::arg("n"));
}
