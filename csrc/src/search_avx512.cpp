// AVX-512 VPOPCNTDQ kernel over the blocked gallery layout [block][word][8 codes].
// Per block of 8 codes and per query: one VPTERNLOGQ ((q ^ x) & m, or VPXORQ unmasked), one
// VPOPCNTQ per word, one compare against the query's limit; the queries' gallery loads are
// shared. A hit (rare once the limit is tight) compresses (distance << 40 | index) keys into the
// query's candidate buffer.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "fasthash/engine.h"

namespace fasthash {

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vpopcntdq");
}

}  // namespace fasthash

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,popcnt")

namespace fasthash {
namespace {

// Out of line (rare): a candidate buffer is full; compact it (top-k) or grow it (radius).
template <int QB>
__attribute__((noinline)) void overflow_all(const KernelArgs& a) {
  for (int i = 0; i < QB; ++i)
    if (a.sel[i]->n >= a.sel[i]->cap) a.sel[i]->overflow();
}

template <int QB, int WT, bool MASK>
void avx512_block(const KernelArgs& a) {
  const int64_t W = WT > 0 ? WT : a.W;
  const uint64_t* qr[QB];
  const uint64_t* mr[QB];
  __m512i lim[QB];
  __m512i q0[QB], m0[QB];  // word 0 of every query (and mask) held in registers
  for (int i = 0; i < QB; ++i) {
    qr[i] = a.q[i];
    mr[i] = MASK ? a.mask[i] : nullptr;
    lim[i] = _mm512_set1_epi64(a.sel[i]->lim);
    q0[i] = _mm512_set1_epi64(static_cast<long long>(qr[i][0]));
    m0[i] = MASK ? _mm512_set1_epi64(static_cast<long long>(mr[i][0])) : _mm512_setzero_si512();
  }
  const int64_t nblk = (a.n + 7) / 8;
  const int tail = static_cast<int>(a.n - (nblk - 1) * 8);
  const uint64_t* xb = a.x;
  for (int64_t b = 0; b < nblk; ++b, xb += W * 8) {
    __m512i acc[QB];
    // 64-bit codes are read straight from the gallery: prefetch 1 KiB ahead (DRAM-bound for
    // few queries; a no-op cost otherwise, and prefetches never fault past the end)
    if (WT == 1) _mm_prefetch(reinterpret_cast<const char*>(xb + 128), _MM_HINT_T0);
    {
      const __m512i g = _mm512_loadu_si512(xb);
      for (int i = 0; i < QB; ++i) {
        const __m512i v = MASK ? _mm512_ternarylogic_epi64(q0[i], g, m0[i], 0x28)
                               : _mm512_xor_si512(q0[i], g);
        acc[i] = _mm512_popcnt_epi64(v);
      }
    }
    for (int64_t w = 1; w < W; ++w) {
      const __m512i g = _mm512_loadu_si512(xb + w * 8);
      for (int i = 0; i < QB; ++i) {
        const __m512i qq = _mm512_set1_epi64(static_cast<long long>(qr[i][w]));
        const __m512i v =
            MASK ? _mm512_ternarylogic_epi64(
                       qq, g, _mm512_set1_epi64(static_cast<long long>(mr[i][w])), 0x28)
                 : _mm512_xor_si512(qq, g);
        acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(v));
      }
    }
    __mmask8 any = 0;
    for (int i = 0; i < QB; ++i) any |= _mm512_cmple_epi64_mask(acc[i], lim[i]);
    if (__builtin_expect(any != 0, 0)) {
      const __mmask8 valid =
          b + 1 == nblk ? static_cast<__mmask8>((1u << tail) - 1u) : static_cast<__mmask8>(0xFF);
      // Branch-free push for every query of the block (hit patterns are random, per-query
      // branches would mispredict): compress (distance << 40 | index) keys of the passing lanes.
      const __m512i idx = _mm512_add_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm512_set1_epi64(a.base + b * 8));
      bool full = false;
#pragma GCC unroll 8
      for (int i = 0; i < QB; ++i) {
        const __mmask8 h = _mm512_cmple_epi64_mask(acc[i], lim[i]) & valid;
        Selector* s = a.sel[i];
        const int64_t n = s->n;
        // the zero-masked form with every lane set is the same VPSLLQ; GCC 12's plain form
        // starts from _mm512_undefined and trips -Wmaybe-uninitialized
        const __m512i key =
            _mm512_or_si512(_mm512_maskz_slli_epi64(0xFF, acc[i], kIndexBits), idx);
        _mm512_storeu_si512(s->buf + n, _mm512_maskz_compress_epi64(h, key));
        s->n = n + __builtin_popcount(h);
        full |= s->n >= s->cap;
      }
      if (__builtin_expect(full, 0)) {
        overflow_all<QB>(a);
#pragma GCC unroll 8
        for (int i = 0; i < QB; ++i) lim[i] = _mm512_set1_epi64(a.sel[i]->lim);
      }
    }
  }
}

// Row-major variant for tasks of few queries on 128/256-bit codes: the 8 codes of a block are
// transposed in registers (VPERMT2Q) instead of through a copy of the chunk, which for one
// query would cost more than the search itself.
template <int WT>
inline void load_rows(const uint64_t* xb, int64_t left, __m512i* g) {
  const int64_t words = left >= 8 ? 8 * WT : left * WT;
  auto ld = [&](int64_t off) {
    const int64_t m = words - off;
    if (m >= 8) return _mm512_loadu_si512(xb + off);
    if (m <= 0) return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi64(static_cast<__mmask8>((1u << m) - 1u), xb + off);
  };
  if (WT == 2) {
    const __m512i a = ld(0), b = ld(8);
    g[0] = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b);
    g[1] = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b);
  } else {  // WT == 4
    const __m512i a = ld(0), b = ld(8), c = ld(16), d = ld(24);
    const __m512i lo = _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13);
    const __m512i hi = _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i t0 = _mm512_permutex2var_epi64(a, lo, b), t1 = _mm512_permutex2var_epi64(a, hi, b);
    const __m512i t2 = _mm512_permutex2var_epi64(c, lo, d), t3 = _mm512_permutex2var_epi64(c, hi, d);
    const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11);
    const __m512i second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
    g[0] = _mm512_permutex2var_epi64(t0, first, t2);
    g[1] = _mm512_permutex2var_epi64(t0, second, t2);
    g[2] = _mm512_permutex2var_epi64(t1, first, t3);
    g[3] = _mm512_permutex2var_epi64(t1, second, t3);
  }
}

template <int QB, int WT, bool MASK>
void avx512_rows(const KernelArgs& a) {
  __m512i lim[QB];
  for (int i = 0; i < QB; ++i) lim[i] = _mm512_set1_epi64(a.sel[i]->lim);
  const int64_t nblk = (a.n + 7) / 8;
  const int tail = static_cast<int>(a.n - (nblk - 1) * 8);
  for (int64_t b = 0; b < nblk; ++b) {
    __m512i g[WT];
    // software prefetch ~2 KiB ahead: with one query the scan is bound by DRAM, and the
    // hardware prefetcher alone leaves bandwidth unused
    for (int l = 0; l < WT; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(a.x + (b + 8) * 8 * WT + l * 8), _MM_HINT_T0);
    load_rows<WT>(a.x + b * 8 * WT, a.n - b * 8, g);
    __m512i acc[QB];
    for (int i = 0; i < QB; ++i) {
      acc[i] = _mm512_setzero_si512();
      for (int w = 0; w < WT; ++w) {
        const __m512i qq = _mm512_set1_epi64(static_cast<long long>(a.q[i][w]));
        const __m512i v =
            MASK ? _mm512_ternarylogic_epi64(
                       qq, g[w], _mm512_set1_epi64(static_cast<long long>(a.mask[i][w])), 0x28)
                 : _mm512_xor_si512(qq, g[w]);
        acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(v));
      }
    }
    __mmask8 any = 0;
    for (int i = 0; i < QB; ++i) any |= _mm512_cmple_epi64_mask(acc[i], lim[i]);
    if (__builtin_expect(any != 0, 0)) {
      const __mmask8 valid =
          b + 1 == nblk ? static_cast<__mmask8>((1u << tail) - 1u) : static_cast<__mmask8>(0xFF);
      const __m512i idx = _mm512_add_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm512_set1_epi64(a.base + b * 8));
      bool full = false;
      for (int i = 0; i < QB; ++i) {
        const __mmask8 h = _mm512_cmple_epi64_mask(acc[i], lim[i]) & valid;
        Selector* s = a.sel[i];
        const int64_t n = s->n;
        const __m512i key =
            _mm512_or_si512(_mm512_maskz_slli_epi64(0xFF, acc[i], kIndexBits), idx);
        _mm512_storeu_si512(s->buf + n, _mm512_maskz_compress_epi64(h, key));
        s->n = n + __builtin_popcount(h);
        full |= s->n >= s->cap;
      }
      if (__builtin_expect(full, 0)) {
        overflow_all<QB>(a);
        for (int i = 0; i < QB; ++i) lim[i] = _mm512_set1_epi64(a.sel[i]->lim);
      }
    }
  }
}

// Distance matrix over the blocked layout: the search kernel's arithmetic, and per query one
// VPMOVQD narrowing store of the 8 distances (masked for the last, partial block).
template <int QB, int WT, bool MASK>
void avx512_dist(const DistArgs& a) {
  const int64_t W = WT > 0 ? WT : a.W;
  const int64_t nblk = (a.n + 7) / 8;
  const uint64_t* xb = a.x;
  for (int64_t b = 0; b < nblk; ++b, xb += W * 8) {
    __m512i acc[QB];
    for (int i = 0; i < QB; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t w = 0; w < W; ++w) {
      const __m512i g = _mm512_loadu_si512(xb + w * 8);
      for (int i = 0; i < QB; ++i) {
        const __m512i qq = _mm512_set1_epi64(static_cast<long long>(a.q[i][w]));
        const __m512i v =
            MASK ? _mm512_ternarylogic_epi64(
                       qq, g, _mm512_set1_epi64(static_cast<long long>(a.mask[i][w])), 0x28)
                 : _mm512_xor_si512(qq, g);
        acc[i] = _mm512_add_epi64(acc[i], _mm512_popcnt_epi64(v));
      }
    }
    const int64_t left = a.n - b * 8;
    const __mmask8 valid =
        left >= 8 ? static_cast<__mmask8>(0xFF) : static_cast<__mmask8>((1u << left) - 1u);
    for (int i = 0; i < QB; ++i)
      _mm512_mask_cvtepi64_storeu_epi32(a.out[i] + b * 8, valid, acc[i]);
  }
}

}  // namespace

KernelFn avx512_kernel(int64_t W, bool masked, int nq) {
#define KERNEL avx512_block
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

DistFn avx512_distances(int64_t W, bool masked, int nq) {
#define KERNEL avx512_dist
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

KernelFn avx512_rows_kernel(int64_t W, bool masked, int nq) {
  if (W != 2 && W != 4) return nullptr;
#define RSEL(QB, M) (W == 2 ? &avx512_rows<QB, 2, M> : &avx512_rows<QB, 4, M>)
  switch (nq) {
    case 1: return masked ? RSEL(1, true) : RSEL(1, false);
    case 2: return masked ? RSEL(2, true) : RSEL(2, false);
    default: return masked ? RSEL(4, true) : RSEL(4, false);
  }
#undef RSEL
}

}  // namespace fasthash

#pragma GCC pop_options
