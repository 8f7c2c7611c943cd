// Scalar POPCNT kernel: row-major gallery, up to 8 queries per pass so each loaded code is reused.
// Compiled with the baseline flags plus POPCNT (present on every x86-64 CPU since 2008 that has
// SSE4.2; the dispatcher checks it): without it __builtin_popcountll would be a table lookup.
#include <cstdint>
#include <vector>

#include "fasthash/engine.h"

namespace fasthash {

bool scalar_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

}  // namespace fasthash

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("popcnt")
#endif

namespace fasthash {
namespace {

template <int QB, int WT, bool MASK>
void scalar_block(const KernelArgs& a) {
  const int64_t W = WT > 0 ? WT : a.W;
  const uint64_t* qr[QB];
  const uint64_t* mr[QB];
  int64_t lim[QB];
  for (int i = 0; i < QB; ++i) {
    qr[i] = a.q[i];
    mr[i] = MASK ? a.mask[i] : nullptr;
    lim[i] = a.sel[i]->lim;
  }
  // one software prefetch per cache line, ~1 KiB ahead (the single-query scan is DRAM-bound)
  const int64_t per_line = W >= 8 ? 1 : 8 / W;
  for (int64_t j = 0; j < a.n; ++j) {
    const uint64_t* xj = a.x + j * W;
    if (j % per_line == 0) __builtin_prefetch(xj + 128, 0, 3);
    for (int i = 0; i < QB; ++i) {
      int64_t d = 0;
      for (int64_t w = 0; w < W; ++w) {
        uint64_t v = qr[i][w] ^ xj[w];
        if (MASK) v &= mr[i][w];
        d += __builtin_popcountll(v);
      }
      if (d <= lim[i]) {
        Selector* s = a.sel[i];
        s->buf[s->n++] = (static_cast<uint64_t>(d) << kIndexBits) | static_cast<uint64_t>(a.base + j);
        if (s->n >= s->cap) {
          s->overflow();
          lim[i] = s->lim;
        }
      }
    }
  }
}

template <int QB, int WT, bool MASK>
void scalar_dist(const DistArgs& a) {
  const int64_t W = WT > 0 ? WT : a.W;
  for (int64_t j = 0; j < a.n; ++j) {
    const uint64_t* xj = a.x + j * W;
    for (int i = 0; i < QB; ++i) {
      int64_t d = 0;
      for (int64_t w = 0; w < W; ++w) {
        uint64_t v = a.q[i][w] ^ xj[w];
        if (MASK) v &= a.mask[i][w];
        d += __builtin_popcountll(v);
      }
      a.out[i][j] = static_cast<int32_t>(d);
    }
  }
}

}  // namespace

void distance_histogram(const uint64_t* q, const uint64_t* m, const uint64_t* x, int64_t n,
                        int64_t W, int64_t* hist) {
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t* xj = x + j * W;
    int64_t d = 0;
    for (int64_t w = 0; w < W; ++w)
      d += __builtin_popcountll((q[w] ^ xj[w]) & (m ? m[w] : ~uint64_t(0)));
    hist[d]++;
  }
}

KernelFn scalar_kernel(int64_t W, bool masked, int nq) {
#define KERNEL scalar_block
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

DistFn scalar_distances(int64_t W, bool masked, int nq) {
#define KERNEL scalar_dist
#include "fasthash/kernel_dispatch.h"
  FASTHASH_PICK_KERNEL()
#undef KERNEL
}

}  // namespace fasthash

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC pop_options
#endif
