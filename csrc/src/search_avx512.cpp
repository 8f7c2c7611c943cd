// AVX-512 VPOPCNTDQ kernel over the blocked gallery layout [block][word][8 codes].
// Per block of 8 codes and per query: one VPTERNLOGQ ((q ^ x) & m, or VPXORQ unmasked), one
// VPOPCNTQ per word, one compare against the query's limit; the queries' gallery loads are
// shared. A hit (rare once the limit is tight) compresses (distance << 40 | index) keys into the
// query's candidate buffer.
#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "fasthash/engine.h"

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
        const __m512i key = _mm512_or_si512(_mm512_slli_epi64(acc[i], kIndexBits), idx);
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

}  // namespace

KernelFn avx512_kernel(int64_t W, bool masked, int nq) {
#define KERNEL avx512_block
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

}  // namespace fasthash

#pragma GCC pop_options
