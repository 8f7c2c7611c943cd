// Public C++ entry points of the search engine (used by the pybind11 bindings).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fasthash/engine.h"

namespace fasthash {

// Most worker threads of one call (num_threads). The pool keeps its threads for the life of the
// process, so the count is bounded; fasthash/_checks.py MAX_THREADS is the same number.
constexpr int kMaxThreads = 1024;

struct SearchInput {
  const uint64_t* q = nullptr;
  int64_t nq = 0;
  const uint64_t* x = nullptr;
  int64_t nx = 0;
  int64_t W = 0;
  const uint64_t* mask = nullptr;  // nullptr, one row [W] (mask_rows = 1) or [nq, W]
  int64_t mask_rows = 0;
  int num_threads = 0;  // <= 0: all hardware threads; at most kMaxThreads
  Simd simd = Simd::Scalar;
};

// Exact top-k: out_d [nq, k] int32, out_i [nq, k] int64, rows ordered by (distance, index).
void topk_search(const SearchInput& in, int64_t k, int32_t* out_d, int64_t* out_i);

// Radius search: lims [nq + 1]; distances and indices filled in the vectors.
void radius_search(const SearchInput& in, int64_t r, int64_t* lims, std::vector<int32_t>* out_d,
                   std::vector<int64_t>* out_i);

// All-pairs distances: out [nq, nx] int32, out[i * nx + j] = popcount((q_i ^ x_j) & m_i) summed
// over the W words (m_i all ones without a mask). nq = 0 or nx = 0 writes nothing.
void distance_matrix(const SearchInput& in, int32_t* out);

// SIMD levels (the rows of simd_table.h): what the CPU supports, the best of them, and the
// names that FASTHASH_SIMD and set_simd_level accept.
bool simd_supported(Simd s);
Simd best_simd();
const char* simd_name(Simd s);
bool parse_simd(const std::string& name, Simd* out);

// Threads used when num_threads is 0: the hardware threads, at most kMaxThreads.
int hardware_threads();

}  // namespace fasthash
