// Search driver: task decomposition, persistent thread pool, selection, merge.
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
#include <thread>
#include <vector>

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

// ---------------------------------------------------------------- SIMD levels

bool simd_supported(Simd s) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (s) {
    case Simd::Scalar:
      return __builtin_cpu_supports("popcnt");
    case Simd::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case Simd::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vpopcntdq");
  }
#endif
  return false;
}

Simd best_simd() {
  if (simd_supported(Simd::Avx512)) return Simd::Avx512;
  if (simd_supported(Simd::Avx2)) return Simd::Avx2;
  return Simd::Scalar;
}

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::Avx512:
      return "avx512";
    case Simd::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool parse_simd(const std::string& name, Simd* out) {
  if (name == "scalar") *out = Simd::Scalar;
  else if (name == "avx2") *out = Simd::Avx2;
  else if (name == "avx512") *out = Simd::Avx512;
  else return false;
  return true;
}

int hardware_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

// ---------------------------------------------------------------- thread pool

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Persistent workers; run(n, f) calls f on the caller and on up to n - 1 workers. f must claim
// its work from a shared counter (every task is done even if no worker ever shows up): on a
// busy machine a sleeping worker may get the CPU only milliseconds later, so the caller never
// waits for workers that have not started -- it closes the job when its own f returns and
// waits only for workers already inside f. Workers spin briefly (~50 us) before sleeping, so
// back-to-back small searches do not pay a futex wake-up each.
class Pool {
 public:
  static Pool& get() {
    static Pool* p = new Pool();  // leaked on purpose: no join at interpreter exit
    return *p;
  }

  void run(int n, const std::function<void(int)>& f) {
    if (n <= 1) {
      f(0);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
    ensure_workers(n - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      active_ = n - 1;
      // gen_ first: a worker that sees open_ == true from this run also sees the new gen_,
      // so a late worker still holding the previous job pointer never runs it
      gen_.fetch_add(1, std::memory_order_seq_cst);
      open_.store(true, std::memory_order_seq_cst);
    }
    cv_.notify_all();
    f(0);
    // Dekker-style hand-off (both sides seq_cst): a worker either registered in running_
    // before this store (and is waited for) or sees the job closed and never touches f.
    open_.store(false, std::memory_order_seq_cst);
    while (running_.load(std::memory_order_seq_cst) != 0) cpu_relax();
  }

 private:
  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      int id = static_cast<int>(workers_.size()) + 1;
      // the generation is read here, before run() publishes the job, so the worker cannot miss it
      const uint64_t start = gen_.load(std::memory_order_acquire);
      workers_.emplace_back([this, id, start] { loop(id, start); });
      workers_.back().detach();
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if (++spins % 64 == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50))
          break;
      }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
      }
      const std::function<void(int)>* job;
      int active;
      {
        // generation, job and worker count are published together under mu_
        std::lock_guard<std::mutex> lk(mu_);
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
        active = active_;
      }
      if (id > active) continue;
      running_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst) && gen_.load(std::memory_order_seq_cst) == seen)
        (*job)(id);
      running_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0;
  std::atomic<uint64_t> gen_{0};
  std::atomic<bool> open_{false};
  std::atomic<int> running_{0};
};

KernelFn pick(Simd s, int64_t W, bool masked, int nq) {
  switch (s) {
    case Simd::Avx512:
      return avx512_kernel(W, masked, nq);
    case Simd::Avx2:
      return avx2_kernel(W, masked, nq);
    default:
      return scalar_kernel(W, masked, nq);
  }
}

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
  p.threads = std::max(1, t);
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

// Runs every task. init(sel, hist) prepares a selector; done(q, split, sel) consumes it.
// guess_k > 0 (top-k with whole-gallery tasks) enables the sampled starting limit below.
template <class Init, class Done>
void run_tasks(const SearchInput& in, const Plan& p, int64_t guess_k, Init init, Done done) {
  const bool simd_layout = in.simd != Simd::Scalar;
  const bool masked = in.mask != nullptr;
  // [0]: the level's kernels; [1]: scalar kernels on the row-major gallery, used by tasks of
  // fewer than 4 queries on multi-word codes, where transposing each chunk into the blocked
  // layout would cost more than the SIMD kernel saves (the copy is shared by a task's queries).
  // With AVX-512 and W = 2 or 4 those few-query tasks use row-major kernels instead.
  KernelFn kern[2][4];
  const bool rows = in.simd == Simd::Avx512 && avx512_rows_kernel(in.W, masked, 1) != nullptr;
  for (int f = 0; f < 2; ++f)
    for (int j = 0; j < 4; ++j)
      kern[f][j] = f == 0   ? pick(in.simd, in.W, masked, 1 << j)
                   : rows ? avx512_rows_kernel(in.W, masked, std::min(4, 1 << j))
                          : pick(Simd::Scalar, in.W, masked, 1 << j);
  const int64_t ntasks = p.ngroups * p.splits;
  const int64_t maxd = 64 * in.W;
  // Large k: register blocks of 4 queries. Candidates pass often (about k ln(N / k) per query)
  // and every passing block pushes for all queries of its register block, so smaller blocks
  // waste less there; the scan itself costs about the same per pair.
  const int max_nb = guess_k >= 256 ? 4 : 8;
  // Several query groups of >= 4 queries over a multi-word gallery of <= 256 MiB: transpose the
  // gallery once (in parallel) rather than every chunk once per group. With one or a few groups
  // the chunks are transposed in L2 instead: writing and re-reading a transposed copy of the
  // whole gallery would cost more than the search (gallery ranges never share a chunk).
  std::vector<uint64_t> whole;
  if (simd_layout && in.W > 1 && p.ngroups >= 4 && p.group >= 4 &&
      in.nx * in.W * 8 <= (int64_t(256) << 20)) {
    const int64_t nblocks = (in.nx + 7) / 8, step = 2048;
    whole.resize(static_cast<size_t>(nblocks * 8 * in.W));
    std::atomic<int64_t> nb{0};
    Pool::get().run(p.threads, [&](int) {
      for (int64_t b; (b = nb.fetch_add(step)) < nblocks;)
        transpose_blocks(in.x, in.nx, in.W, b, std::min(nblocks, b + step),
                         whole.data() + b * 8 * in.W);
    });
  }
  std::atomic<int64_t> next{0};
  std::mutex err_mu;
  std::string err;
  auto worker = [&](int) {
    try {
      std::vector<uint64_t> blocked;
      if (simd_layout) blocked.resize(static_cast<size_t>((p.chunk + 8) * in.W));
      std::vector<Selector> sels(static_cast<size_t>(p.group));
      std::vector<int64_t> hist(static_cast<size_t>(maxd + 1));
      std::vector<const uint64_t*> qrows(static_cast<size_t>(p.group));
      std::vector<const uint64_t*> mrows(static_cast<size_t>(p.group));
      std::vector<Selector*> sp(static_cast<size_t>(p.group));
      std::vector<int64_t> sample_d;
      // Passes the queries [i0, i0 + cnt) of the current group over gallery codes [lo, hi).
      auto scan = [&](int64_t i0, int64_t cnt, int64_t lo, int64_t hi) {
        const bool blocked_kernels = simd_layout && !(in.W > 1 && cnt < 4);
        KernelFn* kf = kern[blocked_kernels ? 0 : 1];
        for (int64_t c0 = lo; c0 < hi; c0 += p.chunk) {
          const int64_t n = std::min(p.chunk, hi - c0);
          const uint64_t* xp = in.x + c0 * in.W;
          if (blocked_kernels && !whole.empty()) {
            xp = whole.data() + c0 * in.W;  // c0 is a multiple of 8: block c0 / 8
          } else if (blocked_kernels && (in.W > 1 || n % 8 != 0)) {
            transpose_blocks(xp, n, in.W, 0, (n + 7) / 8, blocked.data());
            xp = blocked.data();
          }
          int64_t i = i0;
          while (i < i0 + cnt) {
            const int64_t left = i0 + cnt - i;
            const int nb = left >= 8 && max_nb == 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            KernelFn f = kf[nb == 8 ? 3 : nb == 4 ? 2 : nb == 2 ? 1 : 0];
            KernelArgs a{nb, in.W, qrows.data() + i, masked ? mrows.data() + i : nullptr,
                         sp.data() + i, xp, n, c0};
            f(a);
            i += nb;
          }
        }
      };
      for (;;) {
        const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
        if (t >= ntasks) break;
        // splits vary fastest so that concurrent tasks of one query group share its rows
        const int64_t g = t / p.splits, s = t % p.splits;
        const int64_t q0 = g * p.group, nqg = std::min(p.group, in.nq - q0);
        int64_t lo, hi;
        split_range(in, p, s, &lo, &hi);
        for (int64_t i = 0; i < nqg; ++i) {
          sp[i] = &sels[i];
          qrows[i] = in.q + (q0 + i) * in.W;
          if (masked) mrows[i] = in.mask + (in.mask_rows == 1 ? 0 : (q0 + i) * in.W);
        }
        // Sampled starting limit: the streaming limit of a top-k scan starts at the maximum and
        // falls slowly (about k ln(N / k) codes pass it), which dominates for large k. So first
        // histogram the distances to S codes in 16 contiguous pieces spread evenly over the range
        // (a prefix would mislead on sorted galleries) and start the limit at the sample
        // quantile of rank e + sqrt(e) + 1, e = S k / N the expected rank of the k-th distance.
        // If fewer than k codes of the range pass it (about 1 % of random queries), the query is
        // scanned again from the maximum: the range's top-k (merged across ranges later) is exact
        // either way.
        constexpr int64_t kSample = 8192, kPieces = 16;
        bool guessed = false;
        if (guess_k >= 256 && hi - lo >= 32 * kSample) {
          const double e = static_cast<double>(kSample) * guess_k / static_cast<double>(hi - lo);
          const int64_t rank = static_cast<int64_t>(e + std::sqrt(e) + 1);
          if (rank < kSample) {
            guessed = true;
            for (int64_t i = 0; i < nqg; ++i) {
              // a histogram, not a scan: every sampled code would pass a scan's open limit
              std::fill(hist.begin(), hist.end(), 0);
              for (int64_t b = 0; b < kPieces; ++b)
                distance_histogram(qrows[i], masked ? mrows[i] : nullptr,
                                   in.x + (lo + b * ((hi - lo) / kPieces)) * in.W,
                                   kSample / kPieces, in.W, hist.data());
              int64_t t = 0, below = hist[0];
              while (below <= rank && t < maxd) below += hist[++t];
              init(&sels[i], &hist);
              sels[i].lim = std::min(sels[i].lim, t);
            }
          }
        }
        if (!guessed)
          for (int64_t i = 0; i < nqg; ++i) init(&sels[i], &hist);
        scan(0, nqg, lo, hi);
        if (guessed) {
          for (int64_t i = 0; i < nqg; ++i) {
            if (sels[i].n >= guess_k) continue;
            init(&sels[i], &hist);  // the guess was too tight: rescan this query exactly
            scan(i, 1, lo, hi);
          }
        }
        for (int64_t i = 0; i < nqg; ++i) done(q0 + i, s, &sels[i]);
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (err.empty()) err = e.what();
      next.store(ntasks);
    }
  };
  Pool::get().run(p.threads, worker);
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace

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
