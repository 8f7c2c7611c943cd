// AVX2 kernel (no vector popcount): nibble-table popcount (VPSHUFB) summed per 64-bit lane with
// VPSADBW, over the same blocked layout as AVX-512, as two 4-code halves per block.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "fasthash/engine.h"

namespace fasthash {

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
}

}  // namespace fasthash

#pragma GCC push_options
#pragma GCC target("avx2,popcnt")

namespace fasthash {
namespace {

inline __m256i popcnt_bytes(__m256i v, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

template <int QB, int WT, bool MASK>
void avx2_block(const KernelArgs& a) {
  const int64_t W = WT > 0 ? WT : a.W;
  const uint64_t* qr[QB];
  const uint64_t* mr[QB];
  __m256i lim[QB];
  for (int i = 0; i < QB; ++i) {
    qr[i] = a.q[i];
    mr[i] = MASK ? a.mask[i] : nullptr;
    lim[i] = _mm256_set1_epi64x(a.sel[i]->lim);
  }
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                       1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const int64_t nblk = (a.n + 7) / 8;
  const int tail = static_cast<int>(a.n - (nblk - 1) * 8);
  const uint64_t* xb = a.x;
  for (int64_t b = 0; b < nblk; ++b, xb += W * 8) {
    for (int half = 0; half < 2; ++half) {
      __m256i acc[QB];
      for (int i = 0; i < QB; ++i) acc[i] = zero;
      for (int64_t w = 0; w < W; ++w) {
        const __m256i g =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + w * 8 + half * 4));
        for (int i = 0; i < QB; ++i) {
          __m256i v = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(qr[i][w])), g);
          if (MASK) v = _mm256_and_si256(v, _mm256_set1_epi64x(static_cast<long long>(mr[i][w])));
          acc[i] = _mm256_add_epi64(acc[i], _mm256_sad_epu8(popcnt_bytes(v, lut, low), zero));
        }
      }
      int hit[QB];
      int any = 0;
      for (int i = 0; i < QB; ++i) {
        // d <= lim  <=>  !(d > lim); signed compare, lim may be -1
        hit[i] = ~_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(acc[i], lim[i]))) & 0xF;
        any |= hit[i];
      }
      if (__builtin_expect(any != 0, 0)) {
        int valid = 0xF;
        if (b + 1 == nblk) {
          const int left = tail - half * 4;
          valid = left >= 4 ? 0xF : (left <= 0 ? 0 : (1 << left) - 1);
        }
        const int64_t base = a.base + b * 8 + half * 4;
        for (int i = 0; i < QB; ++i) {
          int h = hit[i] & valid;
          if (!h) continue;
          alignas(32) int64_t d[4];
          _mm256_store_si256(reinterpret_cast<__m256i*>(d), acc[i]);
          Selector* s = a.sel[i];
          while (h) {
            const int l = __builtin_ctz(h);
            h &= h - 1;
            if (d[l] > s->lim) continue;  // the limit may have dropped within this group
            s->buf[s->n++] = (static_cast<uint64_t>(d[l]) << kIndexBits) |
                             static_cast<uint64_t>(base + l);
            if (s->n >= s->cap) s->overflow();
          }
          lim[i] = _mm256_set1_epi64x(s->lim);
        }
      }
    }
  }
}

// Distances of QB queries to the 4 codes of one half block, as 4 int32 in the low 128 bits.
template <int QB, int WT, bool MASK>
inline void avx2_half(const DistArgs& a, const uint64_t* xh, __m128i* d) {
  const int64_t W = WT > 0 ? WT : a.W;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                       1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[QB];
  for (int i = 0; i < QB; ++i) acc[i] = zero;
  for (int64_t w = 0; w < W; ++w) {
    const __m256i g = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + w * 8));
    for (int i = 0; i < QB; ++i) {
      __m256i v = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(a.q[i][w])), g);
      if (MASK) v = _mm256_and_si256(v, _mm256_set1_epi64x(static_cast<long long>(a.mask[i][w])));
      acc[i] = _mm256_add_epi64(acc[i], _mm256_sad_epu8(popcnt_bytes(v, lut, low), zero));
    }
  }
  // distances are < 2^31, so the low halves of the 64-bit lanes are the int32 results
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  for (int i = 0; i < QB; ++i)
    d[i] = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(acc[i], even));
}

template <int QB, int WT, bool MASK>
void avx2_dist(const DistArgs& a) {
  const int64_t W = WT > 0 ? WT : a.W;
  const uint64_t* xb = a.x;
  for (int64_t j = 0; j < a.n; j += 4) {
    // half h of block j / 8 starts at word 0, lane 4 h of that block
    const uint64_t* xh = xb + (j / 8) * 8 * W + (j % 8);
    __m128i d[QB];
    avx2_half<QB, WT, MASK>(a, xh, d);
    if (j + 4 <= a.n) {
      for (int i = 0; i < QB; ++i)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.out[i] + j), d[i]);
    } else {
      for (int i = 0; i < QB; ++i) {
        alignas(16) int32_t t[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(t), d[i]);
        for (int64_t l = 0; j + l < a.n; ++l) a.out[i][j + l] = t[l];
      }
    }
  }
}

}  // namespace

KernelFn avx2_kernel(int64_t W, bool masked, int nq) {
#define KERNEL avx2_block
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

DistFn avx2_distances(int64_t W, bool masked, int nq) {
#define KERNEL avx2_dist
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

}  // namespace fasthash

#pragma GCC pop_options
