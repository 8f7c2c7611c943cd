// All-pairs packed Hamming distances (scalar reference path of the engine).
#include <cstdint>

#include "fasthash/popcount.h"

namespace fasthash {

void hamming_all_pairs(const uint64_t* q, int64_t nq, const uint64_t* x, int64_t nx, int64_t words,
                       int32_t* out) {
  for (int64_t i = 0; i < nq; ++i) {
    const uint64_t* qi = q + i * words;
    for (int64_t j = 0; j < nx; ++j) {
      const uint64_t* xj = x + j * words;
      int d = 0;
      for (int64_t w = 0; w < words; ++w) d += popcount64(qi[w] ^ xj[w]);
      out[i * nx + j] = d;
    }
  }
}

}  // namespace fasthash
