// Bit helpers shared by the multi-index hashing build and search (internal to the extension).
#pragma once

#include <cstdint>
#include <cstring>

namespace fasthash {

// One 64-bit word at an address of any alignment (entries have a stride of 8 W + 4 bytes).
inline uint64_t mih_load(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Bits [start, start + len) of a code (bit b is bit b % 64 of word b / 64), len in 1..64.
inline uint64_t mih_bits(uint64_t lo, uint64_t hi, int o, int len) {
  uint64_t v = lo >> o;
  if (o + len > 64) v |= hi << (64 - o);  // o > 0 here
  return len == 64 ? v : v & ((uint64_t(1) << len) - 1);
}

inline uint64_t mih_extract(const uint64_t* code, int start, int len, int64_t W) {
  const int w = start >> 6, o = start & 63;
  return mih_bits(code[w], w + 1 < W ? code[w + 1] : 0, o, len);
}

// The same from an entry's unaligned copy of the code.
inline uint64_t mih_extract_entry(const unsigned char* e, int start, int len, int64_t W) {
  const int w = start >> 6, o = start & 63;
  return mih_bits(mih_load(e + 8 * w), w + 1 < W && o + len > 64 ? mih_load(e + 8 * (w + 1)) : 0,
                  o, len);
}

}  // namespace fasthash
