// The SIMD levels, as one table: everything the driver and the bindings know about an ISA is
// its row. Adding an ISA is a Simd value, one row here and its search_<isa>.cpp exporting the
// functions the row names (declared in engine.h).
#pragma once

#include <cstdint>
#include <string>

#include "fasthash/engine.h"

namespace fasthash {

struct SimdLevel {
  Simd level;
  const char* name;  // as FASTHASH_SIMD, set_simd_level and simd= spell it
  bool (*supported)();
  // The kernels read the blocked layout [ceil(n / 8)][W][8] (else row-major [n][W]).
  bool blocked;
  KernelFn (*search)(int64_t W, bool masked, int nq);
  // Row-major kernels for tasks of fewer than 4 queries on multi-word codes, where transposing a
  // chunk would cost more than the SIMD kernel saves; nullptr (or a factory returning nullptr
  // for this W) means the scalar row's kernels serve them.
  KernelFn (*few_query_rows)(int64_t W, bool masked, int nq);
  DistFn (*distances)(int64_t W, bool masked, int nq);
};

// Slowest first: the first row is the portable baseline, best_simd() the last supported one.
inline constexpr SimdLevel kSimdLevels[] = {
    {Simd::Scalar, "scalar", scalar_supported, false, scalar_kernel, nullptr, scalar_distances},
    {Simd::Avx2, "avx2", avx2_supported, true, avx2_kernel, nullptr, avx2_distances},
    {Simd::Avx512, "avx512", avx512_supported, true, avx512_kernel, avx512_rows_kernel,
     avx512_distances},
};

// The row of a level (the baseline row for a value the table lacks).
const SimdLevel& simd_row(Simd s);
// The level names joined by ", " for error messages.
std::string simd_names();

}  // namespace fasthash
