// Search driver: task decomposition, persistent thread pool, selection, merge; the distance
// matrix runs on the same tasks and chunks.
//
// Work is cut into tasks = (query group of up to 64 queries) x (gallery range). With many
// queries each task covers the whole gallery, so threads never share a query; with few queries
// (fewer than 16 per thread) the gallery is cut into ranges and the per-range candidates of a
// query are merged once at the end. Within a task the gallery is walked in chunks that stay in
// L2 (64 KiB) while every register block of 8 queries passes over them.
#include "fasthash/search.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "fasthash/pool.h"
#include "fasthash/simd_table.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fasthash {

// ---------------------------------------------------------------- selection

void Selector::compact() {
  // Smallest t with count(d <= t) >= k; keep all d < t and the first (k - count(d < t)) with
  // d == t (buffer order is index order), then accept only d < t from now on.
  std::vector<int64_t>& h = *hist;
  std::fill(h.begin(), h.end(), 0);
  const int64_t maxd = static_cast<int64_t>(h.size()) - 1;
  for (int64_t i = 0; i < n; ++i) {
    int64_t d = static_cast<int64_t>(buf[i] >> kIndexBits);
    h[std::min(d, maxd)]++;
  }
  int64_t t = 0, below = 0;
  while (below + h[t] < k) below += h[t++];
  int64_t take_eq = k - below;
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = buf[i];
    const int64_t d = static_cast<int64_t>(key >> kIndexBits);
    if (d < t) {
      buf[m++] = key;
    } else if (d == t && take_eq > 0) {
      buf[m++] = key;
      --take_eq;
    }
  }
  n = m;
  lim = t - 1;
}

int64_t Selector::finish() {
  if (k > 0 && n > k) compact();  // exactly k left, still in index order
  // Stable counting sort by distance: the buffer is in index order (keys arrive by increasing
  // index within a task), so the result is ordered by (distance, index). O(n + bins), where a
  // comparison sort of k = 1000 keys per query would cost as much as the scan.
  const int64_t bins = hist ? static_cast<int64_t>(hist->size()) : 0;
  if (bins == 0 || bins > 4 * n + 1024) {
    std::sort(buf, buf + n);
    return n;
  }
  std::vector<int64_t>& h = *hist;
  std::fill(h.begin(), h.end(), 0);
  for (int64_t i = 0; i < n; ++i) h[buf[i] >> kIndexBits]++;
  int64_t pos = 0;
  for (int64_t t = 0; t < bins; ++t) {
    const int64_t c = h[t];
    h[t] = pos;
    pos += c;
  }
  std::vector<uint64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[h[buf[i] >> kIndexBits]++] = buf[i];
  std::copy(out.begin(), out.end(), buf);
  return n;
}

int hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(std::min<unsigned>(n, kMaxThreads));
}

namespace {

// ---------------------------------------------------------------- tasks and gallery layout

struct Plan {
  int threads;
  int64_t group;   // queries per task
  int64_t ngroups;
  int64_t splits;  // gallery ranges
  int64_t chunk;   // codes per chunk
};

Plan make_plan(const SearchInput& in, int64_t k) {
  Plan p;
  int t = in.num_threads > 0 ? in.num_threads : hardware_threads();
  p.threads = std::max(1, std::min(t, kMaxThreads));
  // gallery ranges of >= 32k codes, and >= 200 k codes so that a range's top-k scan (whose
  // cost grows like k ln(range / k)) stays cheap and can use the sampled limit
  const int64_t maxs = std::max<int64_t>(1, in.nx / std::max<int64_t>(32768, 200 * k));
  const bool big = in.nx * in.W * 8 > (int64_t(32) << 20);     // beyond a typical L3
  if (in.nq >= 16 * static_cast<int64_t>(p.threads)) {
    if (big) {
      // DRAM-resident gallery: every task streams the gallery once, so use the largest query
      // groups and cut the gallery into ranges instead when that leaves threads idle
      p.group = 64;
      const int64_t groups = (in.nq + 63) / 64;
      const int64_t want = 2 * static_cast<int64_t>(p.threads);
      p.splits = groups >= want ? 1 : std::min(maxs, (want + groups - 1) / groups);
    } else {
      p.splits = 1;
      // at most 64 queries per task, and enough tasks to keep every thread busy
      int64_t per = (in.nq + 4 * p.threads - 1) / (4 * p.threads);
      p.group = std::min<int64_t>(64, std::max<int64_t>(8, (per + 7) / 8 * 8));
    }
  } else {
    p.group = std::min<int64_t>(64, in.nq);
    // a few ranges per thread for balance on a shared machine; with large k one range per
    // thread, as every range collects (and the merge sorts) its own k candidates
    int64_t want = static_cast<int64_t>(p.threads) * (p.threads > 1 && k < 256 ? 4 : 1);
    p.splits = std::max<int64_t>(1, std::min(want, maxs));
  }
  p.ngroups = (in.nq + p.group - 1) / p.group;
  p.chunk = std::max<int64_t>(64, (8192 / in.W) / 8 * 8);
  if (p.threads > p.ngroups * p.splits) p.threads = static_cast<int>(p.ngroups * p.splits);
  return p;
}

// Gallery range of split s: boundaries on multiples of 8 so only the last chunk is partial.
void split_range(const SearchInput& in, const Plan& p, int64_t s, int64_t* lo, int64_t* hi) {
  int64_t blocks = (in.nx + 7) / 8;
  *lo = std::min(in.nx, blocks * s / p.splits * 8);
  *hi = std::min(in.nx, blocks * (s + 1) / p.splits * 8);
}

// Blocks [b0, b1) of codes x[0, n) in the blocked layout [block][word][8] at dst (block b0 at
// dst), the last block zero padded.
void transpose_blocks(const uint64_t* x, int64_t n, int64_t W, int64_t b0, int64_t b1,
                      uint64_t* dst) {
  for (int64_t b = b0; b < b1; ++b) {
    uint64_t* d = dst + (b - b0) * 8 * W;
    const uint64_t* src = x + b * 8 * W;
    if (b * 8 + 8 <= n) {
      for (int64_t w = 0; w < W; ++w)
        for (int64_t l = 0; l < 8; ++l) d[w * 8 + l] = src[l * W + w];
    } else {
      std::fill(d, d + 8 * W, uint64_t(0));
      for (int64_t l = 0; b * 8 + l < n; ++l)
        for (int64_t w = 0; w < W; ++w) d[w * 8 + l] = src[l * W + w];
    }
  }
}

// The whole gallery in the blocked layout, or empty when the chunks are transposed in L2
// instead. Worth it for several query groups of >= 4 queries over a multi-word gallery of
// <= 256 MiB: then every chunk would be transposed once per group. With one or a few groups,
// writing and re-reading a transposed copy of the whole gallery would cost more than the search
// (gallery ranges never share a chunk).
std::vector<uint64_t> transpose_gallery(const SearchInput& in, const Plan& p, bool blocked) {
  std::vector<uint64_t> whole;
  if (!blocked || in.W == 1 || p.ngroups < 4 || p.group < 4 ||
      in.nx * in.W * 8 > (int64_t(256) << 20))
    return whole;
  const int64_t nblocks = (in.nx + 7) / 8, step = 2048;
  whole.resize(static_cast<size_t>(nblocks * 8 * in.W));
  run_parallel(p.threads, (nblocks + step - 1) / step, [&](const auto& claim) {
    for (int64_t t; (t = claim()) >= 0;)
      transpose_blocks(in.x, in.nx, in.W, t * step, std::min(nblocks, (t + 1) * step),
                       whole.data() + t * step * 8 * in.W);
  });
  return whole;
}

// Gallery codes [c0, c0 + n) as a kernel reads them: row-major in place, or blocked -- from the
// whole transposed gallery, in place for 64-bit codes in whole blocks (the layouts coincide), or
// transposed now into buf ((n + 8) * W words).
const uint64_t* chunk_codes(const SearchInput& in, const std::vector<uint64_t>& whole,
                            bool blocked, int64_t c0, int64_t n, uint64_t* buf) {
  const uint64_t* xp = in.x + c0 * in.W;
  if (!blocked) return xp;
  if (!whole.empty()) return whole.data() + c0 * in.W;  // c0 is a multiple of 8: block c0 / 8
  if (in.W == 1 && n % 8 == 0) return xp;
  transpose_blocks(xp, n, in.W, 0, (n + 7) / 8, buf);
  return buf;
}

// Kernels of one call, by [few][log2 of the register block]: few = 0 the level's kernels,
// few = 1 those of tasks of fewer than 4 queries on multi-word codes (table: few_query_rows).
template <class Fn>
struct KernelSet {
  Fn f[2][4];
  bool blocked;  // layout of the few = 0 kernels; the few = 1 kernels are row-major

  bool use_blocked(int64_t W, int64_t cnt) const { return blocked && !(W > 1 && cnt < 4); }
  // Queries of the next register block, given `left` queries remaining.
  static int block(int64_t left, int max_nb) {
    return left >= 8 && max_nb == 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
  }
  Fn get(bool blocked_kernels, int nb) const {
    return f[blocked_kernels ? 0 : 1][nb == 8 ? 3 : nb == 4 ? 2 : nb == 2 ? 1 : 0];
  }
};

KernelSet<KernelFn> search_kernels(Simd s, int64_t W, bool masked) {
  const SimdLevel& L = simd_row(s);
  const SimdLevel& base = kSimdLevels[0];
  const bool rows = L.few_query_rows != nullptr && L.few_query_rows(W, masked, 1) != nullptr;
  KernelSet<KernelFn> k;
  k.blocked = L.blocked;
  // the row-major kernels (AVX-512: W = 2 or 4) come in register blocks of at most 4 queries;
  // few-query tasks never use a block of 8
  for (int j = 0; j < 4; ++j) {
    k.f[0][j] = L.search(W, masked, 1 << j);
    k.f[1][j] = rows ? L.few_query_rows(W, masked, std::min(4, 1 << j))
                     : base.search(W, masked, 1 << j);
  }
  return k;
}

KernelSet<DistFn> distance_kernels(Simd s, int64_t W, bool masked) {
  const SimdLevel& L = simd_row(s);
  KernelSet<DistFn> k;
  k.blocked = L.blocked;
  for (int j = 0; j < 4; ++j) {
    k.f[0][j] = L.distances(W, masked, 1 << j);
    k.f[1][j] = kSimdLevels[0].distances(W, masked, 1 << j);
  }
  return k;
}

// ---------------------------------------------------------------- top-k / radius tasks

// What every task of one top-k or radius call shares.
struct ScanContext {
  const SearchInput& in;
  const Plan& p;
  KernelSet<KernelFn> kern;
  std::vector<uint64_t> whole;  // the blocked gallery, or empty (see transpose_gallery)
  int64_t guess_k;              // > 0: top-k that may start from a sampled limit
  int max_nb;                   // largest register block of queries
};

// A worker's buffers, reused by its tasks; entry i of the row vectors is query i of the group.
struct TaskScratch {
  std::vector<uint64_t> blocked;  // one chunk transposed
  std::vector<Selector> sels;
  std::vector<int64_t> hist;
  std::vector<const uint64_t*> qrows, mrows;
  std::vector<Selector*> sp;

  explicit TaskScratch(const ScanContext& c)
      : blocked(c.kern.blocked ? static_cast<size_t>((c.p.chunk + 8) * c.in.W) : 0),
        sels(static_cast<size_t>(c.p.group)),
        hist(static_cast<size_t>(64 * c.in.W + 1)),
        qrows(static_cast<size_t>(c.p.group)),
        mrows(static_cast<size_t>(c.p.group)),
        sp(static_cast<size_t>(c.p.group)) {}
};

// Passes the queries [i0, i0 + cnt) of the current group over gallery codes [lo, hi), chunk by
// chunk, each chunk staying in L2 while every register block of queries passes over it.
void scan(const ScanContext& c, TaskScratch& s, int64_t i0, int64_t cnt, int64_t lo, int64_t hi) {
  const SearchInput& in = c.in;
  const bool blocked = c.kern.use_blocked(in.W, cnt);
  for (int64_t c0 = lo; c0 < hi; c0 += c.p.chunk) {
    const int64_t n = std::min(c.p.chunk, hi - c0);
    const uint64_t* xp = chunk_codes(in, c.whole, blocked, c0, n, s.blocked.data());
    for (int64_t i = i0; i < i0 + cnt;) {
      const int nb = KernelSet<KernelFn>::block(i0 + cnt - i, c.max_nb);
      KernelArgs a{nb, in.W, s.qrows.data() + i, in.mask ? s.mrows.data() + i : nullptr,
                   s.sp.data() + i, xp, n, c0};
      c.kern.get(blocked, nb)(a);
      i += nb;
    }
  }
}

// Sampled starting limit: the streaming limit of a top-k scan starts at the maximum and falls
// slowly (about k ln(N / k) codes pass it), which dominates for large k. So histogram the
// distances to S codes in 16 contiguous pieces spread evenly over the range (a prefix would
// mislead on sorted galleries) and start the limit at the sample quantile of rank
// e + sqrt(e) + 1, e = S k / N the expected rank of the k-th distance. Returns false (selectors
// untouched) when the range is too small for a useful sample.
template <class Init>
bool sampled_limits(const ScanContext& c, TaskScratch& s, int64_t nqg, int64_t lo, int64_t hi,
                    Init& init) {
  constexpr int64_t kSample = 8192, kPieces = 16;
  if (c.guess_k < 256 || hi - lo < 32 * kSample) return false;
  const double e = static_cast<double>(kSample) * c.guess_k / static_cast<double>(hi - lo);
  const int64_t rank = static_cast<int64_t>(e + std::sqrt(e) + 1);
  if (rank >= kSample) return false;
  const int64_t maxd = 64 * c.in.W;
  for (int64_t i = 0; i < nqg; ++i) {
    // a histogram, not a scan: every sampled code would pass a scan's open limit
    std::fill(s.hist.begin(), s.hist.end(), 0);
    for (int64_t b = 0; b < kPieces; ++b)
      distance_histogram(s.qrows[i], c.in.mask ? s.mrows[i] : nullptr,
                         c.in.x + (lo + b * ((hi - lo) / kPieces)) * c.in.W, kSample / kPieces,
                         c.in.W, s.hist.data());
    int64_t t = 0, below = s.hist[0];
    while (below <= rank && t < maxd) below += s.hist[++t];
    init(&s.sels[i], &s.hist);
    s.sels[i].lim = std::min(s.sels[i].lim, t);
  }
  return true;
}

// One task: the queries of group g over gallery range `split`, handed to done() one by one.
template <class Init, class Done>
void run_task(const ScanContext& c, TaskScratch& s, int64_t g, int64_t split, Init& init,
              Done& done) {
  const SearchInput& in = c.in;
  const int64_t q0 = g * c.p.group, nqg = std::min(c.p.group, in.nq - q0);
  int64_t lo, hi;
  split_range(in, c.p, split, &lo, &hi);
  for (int64_t i = 0; i < nqg; ++i) {
    s.sp[i] = &s.sels[i];
    s.qrows[i] = in.q + (q0 + i) * in.W;
    if (in.mask) s.mrows[i] = in.mask + (in.mask_rows == 1 ? 0 : (q0 + i) * in.W);
  }
  const bool guessed = sampled_limits(c, s, nqg, lo, hi, init);
  if (!guessed)
    for (int64_t i = 0; i < nqg; ++i) init(&s.sels[i], &s.hist);
  scan(c, s, 0, nqg, lo, hi);
  // Fewer than k codes of the range passed the sampled limit (about 1 % of random queries): scan
  // the query again from the maximum, so the range's top-k (merged across ranges later) is exact.
  if (guessed) {
    for (int64_t i = 0; i < nqg; ++i) {
      if (s.sels[i].n >= c.guess_k) continue;
      init(&s.sels[i], &s.hist);
      scan(c, s, i, 1, lo, hi);
    }
  }
  for (int64_t i = 0; i < nqg; ++i) done(q0 + i, split, &s.sels[i]);
}

// Runs every task. init(sel, hist) prepares a selector; done(q, split, sel) consumes it.
// guess_k > 0 (top-k) enables the sampled starting limit.
template <class Init, class Done>
void run_tasks(const SearchInput& in, const Plan& p, int64_t guess_k, Init init, Done done) {
  // Large k: register blocks of 4 queries. Candidates pass often (about k ln(N / k) per query)
  // and every passing block pushes for all queries of its register block, so smaller blocks
  // waste less there; the scan itself costs about the same per pair.
  const ScanContext c{in, p, search_kernels(in.simd, in.W, in.mask != nullptr),
                      transpose_gallery(in, p, simd_row(in.simd).blocked), guess_k,
                      guess_k >= 256 ? 4 : 8};
  run_parallel(p.threads, p.ngroups * p.splits, [&](const auto& claim) {
    TaskScratch s(c);
    // splits vary fastest so that concurrent tasks of one query group share its rows
    for (int64_t t; (t = claim()) >= 0;) run_task(c, s, t / p.splits, t % p.splits, init, done);
  });
}

// ---------------------------------------------------------------- distance matrix

// One task of distance_matrix: rows [q0, q0 + nqg) x columns [lo, hi) of out.
void distance_task(const SearchInput& in, const Plan& p, const KernelSet<DistFn>& kern,
                   const std::vector<uint64_t>& whole, int64_t q0, int64_t nqg, int64_t lo,
                   int64_t hi, uint64_t* buf, int32_t* out) {
  const bool blocked = kern.use_blocked(in.W, nqg);
  const uint64_t* qrows[8];
  const uint64_t* mrows[8];
  int32_t* orows[8];
  for (int64_t c0 = lo; c0 < hi; c0 += p.chunk) {
    const int64_t n = std::min(p.chunk, hi - c0);
    const uint64_t* xp = chunk_codes(in, whole, blocked, c0, n, buf);
    for (int64_t i = q0; i < q0 + nqg;) {
      const int nb = KernelSet<DistFn>::block(q0 + nqg - i, 8);
      for (int r = 0; r < nb; ++r) {
        qrows[r] = in.q + (i + r) * in.W;
        mrows[r] = in.mask ? in.mask + (in.mask_rows == 1 ? 0 : (i + r) * in.W) : nullptr;
        orows[r] = out + (i + r) * in.nx + c0;
      }
      DistArgs a{nb, in.W, qrows, in.mask ? mrows : nullptr, xp, n, orows};
      kern.get(blocked, nb)(a);
      i += nb;
    }
  }
}

}  // namespace

void distance_matrix(const SearchInput& in, int32_t* out) {
  if (in.nq == 0 || in.nx == 0) return;
  // the tasks of a radius search: no k, so the gallery ranges are sized for threads alone
  const Plan p = make_plan(in, 0);
  const KernelSet<DistFn> kern = distance_kernels(in.simd, in.W, in.mask != nullptr);
  const std::vector<uint64_t> whole = transpose_gallery(in, p, kern.blocked);
  run_parallel(p.threads, p.ngroups * p.splits, [&](const auto& claim) {
    std::vector<uint64_t> buf(kern.blocked ? static_cast<size_t>((p.chunk + 8) * in.W) : 0);
    for (int64_t t; (t = claim()) >= 0;) {
      const int64_t q0 = t / p.splits * p.group;
      int64_t lo, hi;
      split_range(in, p, t % p.splits, &lo, &hi);
      distance_task(in, p, kern, whole, q0, std::min(p.group, in.nq - q0), lo, hi, buf.data(),
                    out);
    }
  });
}

void topk_search(const SearchInput& in, int64_t k, int32_t* out_d, int64_t* out_i) {
  Plan p = make_plan(in, k);
  const int64_t maxd = 64 * in.W;
  // with gallery splits, each (query, split) keeps its own sorted top-k, merged afterwards
  std::vector<uint64_t> part;
  std::vector<int64_t> part_n;
  if (p.splits > 1) {
    part.resize(static_cast<size_t>(in.nq * p.splits * k));
    part_n.resize(static_cast<size_t>(in.nq * p.splits));
  }
  auto init = [&](Selector* s, std::vector<int64_t>* h) { s->init_topk(k, maxd, h); };
  auto done = [&](int64_t q, int64_t sidx, Selector* s) {
    const int64_t n = s->finish();
    if (p.splits == 1) {
      for (int64_t j = 0; j < n; ++j) {
        out_d[q * k + j] = static_cast<int32_t>(s->buf[j] >> kIndexBits);
        out_i[q * k + j] = static_cast<int64_t>(s->buf[j] & kIndexMask);
      }
    } else {
      std::memcpy(&part[(q * p.splits + sidx) * k], s->buf, static_cast<size_t>(n) * 8);
      part_n[q * p.splits + sidx] = n;
    }
  };
  run_tasks(in, p, k, init, done);
  if (p.splits > 1) {
    std::vector<uint64_t> all;
    for (int64_t q = 0; q < in.nq; ++q) {
      all.clear();
      for (int64_t s = 0; s < p.splits; ++s) {
        const uint64_t* src = &part[(q * p.splits + s) * k];
        all.insert(all.end(), src, src + part_n[q * p.splits + s]);
      }
      std::partial_sort(all.begin(), all.begin() + k, all.end());
      for (int64_t j = 0; j < k; ++j) {
        out_d[q * k + j] = static_cast<int32_t>(all[j] >> kIndexBits);
        out_i[q * k + j] = static_cast<int64_t>(all[j] & kIndexMask);
      }
    }
  }
}

void radius_search(const SearchInput& in, int64_t r, int64_t* lims, std::vector<int32_t>* out_d,
                   std::vector<int64_t>* out_i) {
  Plan p = make_plan(in, 0);
  std::vector<std::vector<uint64_t>> part(static_cast<size_t>(in.nq * p.splits));
  auto init = [&](Selector* s, std::vector<int64_t>* h) { s->init_radius(r, h); };
  auto done = [&](int64_t q, int64_t sidx, Selector* s) {
    const int64_t n = s->finish();
    part[q * p.splits + sidx].assign(s->buf, s->buf + n);
  };
  run_tasks(in, p, 0, init, done);
  lims[0] = 0;
  for (int64_t q = 0; q < in.nq; ++q) {
    int64_t c = 0;
    for (int64_t s = 0; s < p.splits; ++s) c += static_cast<int64_t>(part[q * p.splits + s].size());
    lims[q + 1] = lims[q] + c;
  }
  out_d->resize(static_cast<size_t>(lims[in.nq]));
  out_i->resize(static_cast<size_t>(lims[in.nq]));
  std::vector<uint64_t> all;
  for (int64_t q = 0; q < in.nq; ++q) {
    all.clear();
    for (int64_t s = 0; s < p.splits; ++s) {
      auto& v = part[q * p.splits + s];
      all.insert(all.end(), v.begin(), v.end());
      std::vector<uint64_t>().swap(v);
    }
    if (p.splits > 1) std::sort(all.begin(), all.end());
    int64_t o = lims[q];
    for (uint64_t key : all) {
      (*out_d)[o] = static_cast<int32_t>(key >> kIndexBits);
      (*out_i)[o] = static_cast<int64_t>(key & kIndexMask);
      ++o;
    }
  }
}

}  // namespace fasthash
