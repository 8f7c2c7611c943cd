// Exact Hamming search engine: shared declarations of the driver and the per-ISA kernels.
//
// The search is written once: the driver (search.cpp) splits work into (query block, gallery
// range) tasks on a persistent thread pool; a kernel (one per ISA, in search_<isa>.cpp, each
// compiled with its own target pragma) computes distances for up to 8 queries against a block of
// gallery codes and pushes the codes that pass each query's threshold into that query's
// candidate buffer (a Selector). Selection is threshold + counting: no heap. The distance-matrix
// kernels share the layouts and the driver's tasks, and write every distance instead.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fasthash {

enum class Simd : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// A candidate is one uint64 key: distance in the high bits, gallery index in the low 40 bits, so
// sorting keys sorts by (distance, index) -- the tie-break of a stable argsort.
constexpr int kIndexBits = 40;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
constexpr int kSlack = 8;  // a kernel may write up to 8 keys past `n` before calling overflow()

// Per-query candidate buffer with an acceptance limit: a code is pushed iff distance <= lim.
//  * top-k: when the buffer fills, compact() keeps exactly the k best so far (by distance, then
//    index: keys arrive in increasing index order within a task) and lowers lim so that only
//    strictly better distances are accepted afterwards. lim < 0 means nothing can enter.
//  * radius: lim = r never changes; the buffer grows.
struct Selector {
  int64_t lim = 0;
  int64_t n = 0;
  int64_t cap = 0;
  int64_t k = 0;  // 0 for radius search
  uint64_t* buf = nullptr;
  std::vector<uint64_t> storage;
  std::vector<int64_t>* hist = nullptr;  // scratch histogram, bins 0..max distance

  void init_topk(int64_t k_, int64_t max_dist, std::vector<int64_t>* h) {
    k = k_;
    lim = max_dist;
    n = 0;
    cap = k_ * 2 > k_ + 256 ? k_ * 2 : k_ + 256;
    storage.resize(static_cast<size_t>(cap + kSlack));
    buf = storage.data();
    hist = h;
  }
  void init_radius(int64_t r, std::vector<int64_t>* h = nullptr) {
    k = 0;
    hist = h;
    lim = r;
    n = 0;
    cap = 256;
    storage.resize(static_cast<size_t>(cap + kSlack));
    buf = storage.data();
  }
  // Called by the kernels when n >= cap.
  void overflow() {
    if (k == 0) {
      cap *= 2;
      storage.resize(static_cast<size_t>(cap + kSlack));
      buf = storage.data();
    } else {
      compact();
    }
  }
  void compact();
  // Sorts the candidates by (distance, index); top-k keeps only the first k. Returns the count.
  int64_t finish();
};

// One call of a kernel: `nq` (1..8) queries against `n` gallery codes starting at global index
// `base`. `x` is row-major [n, W] for the scalar kernel, and for the SIMD kernels the blocked
// layout [ceil(n / 8)][W][8] (word w of 8 consecutive codes side by side), padded to whole blocks.
struct KernelArgs {
  int nq;
  int64_t W;
  const uint64_t* const* q;     // nq query rows, W words each
  const uint64_t* const* mask;  // nq mask rows, or nullptr for no mask
  Selector* const* sel;         // nq selectors
  const uint64_t* x;
  int64_t n;
  int64_t base;
};

using KernelFn = void (*)(const KernelArgs&);

// One call of a distance-matrix kernel: `nq` (1..8) queries against `n` gallery codes in the
// layout of the level's search kernels (above); writes out[i][j] for j < n and nothing past it.
struct DistArgs {
  int nq;
  int64_t W;
  const uint64_t* const* q;
  const uint64_t* const* mask;  // nq mask rows, or nullptr for no mask
  const uint64_t* x;
  int64_t n;
  int32_t* const* out;  // nq output rows, each at the column of the first code
};

using DistFn = void (*)(const DistArgs&);

// What each ISA file exports; the level table (simd_table.h) lists them. supported() reads
// CPUID and is compiled for the baseline, so it is safe to call on any x86-64 CPU.
bool scalar_supported();
bool avx2_supported();
bool avx512_supported();
KernelFn scalar_kernel(int64_t W, bool masked, int nq);
KernelFn avx2_kernel(int64_t W, bool masked, int nq);
KernelFn avx512_kernel(int64_t W, bool masked, int nq);
DistFn scalar_distances(int64_t W, bool masked, int nq);
DistFn avx2_distances(int64_t W, bool masked, int nq);
DistFn avx512_distances(int64_t W, bool masked, int nq);
// hist[d] += 1 for the distance d of each of the n row-major codes x to query q (mask m or null).
// Used on small samples only, so one scalar POPCNT version serves every level.
void distance_histogram(const uint64_t* q, const uint64_t* m, const uint64_t* x, int64_t n,
                        int64_t W, int64_t* hist);
// Row-major AVX-512 kernels for W = 2 or 4 and nq in {1, 2, 4} (nullptr otherwise).
KernelFn avx512_rows_kernel(int64_t W, bool masked, int nq);

}  // namespace fasthash
