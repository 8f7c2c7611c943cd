// Portable 64-bit popcount used by the scalar paths.
#pragma once
#include <cstdint>

namespace fasthash {

inline int popcount64(uint64_t x) { return __builtin_popcountll(x); }

}  // namespace fasthash
