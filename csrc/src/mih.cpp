// Multi-index hashing: exact k-NN and radius search over the tables of mih_build (fasthash/mih.h).
//
// Per query: each table's substring of the query and of its mask; the tables probed are those
// whose substring has at most kMihMaxWildcards masked-out bits (a masked-out bit is a wildcard:
// every value of it is enumerated), fewest wildcards first. k-NN probes radius 0, 1, 2, ... of
// the substring distance table by table and stops as soon as the k-th best distance found is
// covered by the pigeonhole guarantee (mih.h); radius search probes each table only as far as
// the guarantee for r needs. A candidate is verified by its full (masked) distance from the
// entry's copy of the code (POPCNT, the scalar kernel's arithmetic: a bucket holds a handful of
// codes, too few for the blocked SIMD kernels); it is de-duplicated by a per-thread bitset over
// positions whose set bits are cleared from a list at the end of the query (no O(N) reset).
// Queries are claimed one at a time by the engine's thread pool (run_parallel).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "fasthash/engine.h"
#include "fasthash/mih.h"
#include "fasthash/mih_detail.h"
#include "fasthash/pool.h"
#include "fasthash/search.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("popcnt")
#endif

namespace fasthash {
namespace {

// One probed table of one query: its query substring, the bits that count (mask) as single-bit
// words, and the wildcard bits.
struct Probe {
  const MihTable* t;
  uint64_t qkey;
  uint64_t wild;
  int active;
  uint64_t bit[64];
};

struct Scratch {
  std::vector<uint64_t> seen;  // bitset over positions
  std::vector<uint32_t> touched;
  std::vector<uint64_t> cand;  // (distance << 40 | position) keys
  std::vector<Probe> probes;
  explicit Scratch(const MihTables& t)
      : seen(static_cast<size_t>(t.n / 64 + 1), 0), probes(t.tables.size()) {}
  void clear_seen() {
    for (uint32_t p : touched) seen[p >> 6] &= ~(uint64_t(1) << (p & 63));
    touched.clear();
  }
};

// Per-query state of a search: candidate keys below `thr` are kept (top-k: the k best so far
// once compacted), `cost` counts probes and entries against the budget.
struct QueryState {
  const MihTables& t;
  const uint64_t* q;
  const uint64_t* m;
  Scratch& s;
  int64_t k;        // 0: radius search
  uint64_t thr;     // accept keys < thr
  int64_t cap;
  double budget;    // <= 0: unlimited
  double cost = 0;
  int64_t probes = 0, entries = 0;
  bool over = false;  // the budget ran out

  // top-k: keep the k smallest keys and accept only smaller ones afterwards
  void compact() {
    if (k == 0 || static_cast<int64_t>(s.cand.size()) < k) return;
    if (static_cast<int64_t>(s.cand.size()) > k) {
      std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end());
      s.cand.resize(static_cast<size_t>(k));
    }
    thr = *std::max_element(s.cand.begin(), s.cand.end());
  }

  void visit(uint64_t key) {
    const MihTable& tb = *probe_table;
    uint32_t b, e;
    ++probes;
    cost += kMihProbeCost;
    if (tb.top_bits == tb.len) {
      b = tb.dir[key];
      e = tb.dir[key + 1];
    } else {
      const uint64_t top = key >> (tb.len - tb.top_bits);
      const uint64_t* lo = tb.keys.data() + tb.dir[top];
      const uint64_t* hi = tb.keys.data() + tb.dir[top + 1];
      const uint64_t* it = std::lower_bound(lo, hi, key);
      if (it == hi || *it != key) return;
      const size_t u = static_cast<size_t>(it - tb.keys.data());
      b = tb.off[u];
      e = tb.off[u + 1];
    }
    const int64_t W = t.W, stride = t.stride;
    // checked before the bucket is read: one huge bucket (many equal codes) must not cost
    // more than the budget; the aborted query is finished by the scan
    if (budget > 0 && cost + kMihEntryCost * (e - b) > budget) {
      over = true;
      return;
    }
    entries += e - b;
    cost += kMihEntryCost * (e - b);
    const unsigned char* p = tb.entries.get() + static_cast<int64_t>(b) * stride;
    for (uint32_t j = b; j < e; ++j, p += stride) {
      uint32_t pos;
      std::memcpy(&pos, p + 8 * W, 4);
      uint64_t& word = s.seen[pos >> 6];
      const uint64_t bit = uint64_t(1) << (pos & 63);
      if (word & bit) continue;
      word |= bit;
      s.touched.push_back(pos);
      int64_t d = 0;
      for (int64_t w = 0; w < W; ++w) {
        uint64_t v = q[w] ^ mih_load(p + 8 * w);
        if (m) v &= m[w];
        d += __builtin_popcountll(v);
      }
      const uint64_t ck = (static_cast<uint64_t>(d) << kIndexBits) | pos;
      if (ck >= thr) continue;
      s.cand.push_back(ck);
      if (static_cast<int64_t>(s.cand.size()) >= cap) compact();
    }
  }

  // Every key at substring distance exactly r (over the active bits) of probe P, all wildcard
  // values each. Returns false once the budget is spent.
  bool probe_radius(const Probe& P, int r) {
    if (r > P.active) return true;
    probe_table = P.t;
    int c[64];
    for (int i = 0; i < r; ++i) c[i] = i;
    const uint64_t keep = ~P.wild;
    for (;;) {
      uint64_t f = 0;
      for (int i = 0; i < r; ++i) f |= P.bit[c[i]];
      const uint64_t base = (P.qkey ^ f) & keep;
      uint64_t g = 0;
      do {  // every subset g of the wildcard bits
        visit(base | g);
        g = (g - P.wild) & P.wild;
      } while (g != 0 && !over);
      if (over || (budget > 0 && cost > budget)) {
        over = true;
        return false;
      }
      int i = r - 1;
      while (i >= 0 && c[i] == P.active - r + i) --i;
      if (i < 0) return true;
      ++c[i];
      for (int j = i + 1; j < r; ++j) c[j] = c[j - 1] + 1;
    }
  }

  const MihTable* probe_table = nullptr;
};

// The tables this query probes, in probe order (fewest wildcards first); their number.
int plan_probes(const MihTables& t, const uint64_t* q, const uint64_t* m, Scratch& s) {
  int np = 0;
  for (const MihTable& tb : t.tables) {
    const uint64_t all = tb.len == 64 ? ~uint64_t(0) : (uint64_t(1) << tb.len) - 1;
    const uint64_t act = m ? mih_extract(m, tb.start, tb.len, t.W) : all;
    const uint64_t wild = ~act & all;
    if (__builtin_popcountll(wild) > kMihMaxWildcards) continue;
    Probe& P = s.probes[static_cast<size_t>(np++)];
    P.t = &tb;
    P.qkey = mih_extract(q, tb.start, tb.len, t.W);
    P.wild = wild;
    P.active = 0;
    for (uint64_t a = act; a; a &= a - 1) P.bit[P.active++] = a & (~a + 1);
  }
  std::stable_sort(s.probes.begin(), s.probes.begin() + np, [](const Probe& a, const Probe& b) {
    return __builtin_popcountll(a.wild) < __builtin_popcountll(b.wild);
  });
  return np;
}

// k-NN of one query; false when not done (no usable table, or the budget ran out).
bool topk_one(QueryState& st, int np) {
  if (np == 0) return false;
  int maxa = 0;
  for (int j = 0; j < np; ++j) maxa = std::max(maxa, st.s.probes[static_cast<size_t>(j)].active);
  for (int r = 0; r <= maxa; ++r) {
    for (int j = 0; j < np; ++j) {
      if (!st.probe_radius(st.s.probes[static_cast<size_t>(j)], r)) return false;
      // every code within np * r + j has been seen (mih.h)
      if (static_cast<int64_t>(st.s.cand.size()) >= st.k) {
        st.compact();
        if (static_cast<int64_t>(st.thr >> kIndexBits) <= static_cast<int64_t>(np) * r + j)
          return true;
      }
    }
  }
  return true;  // every substring value of a table was probed: every code was seen
}

// Radius r of one query (r below the code length).
bool radius_one(QueryState& st, int np, int64_t r) {
  if (np == 0) return false;
  const int64_t rr = r / np, jmax = r % np;
  for (int64_t rad = 0; rad <= rr; ++rad) {
    for (int j = 0; j < np; ++j) {
      if (rad == rr && j > jmax) break;
      const Probe& P = st.s.probes[static_cast<size_t>(j)];
      if (rad > P.active) continue;
      if (!st.probe_radius(P, static_cast<int>(rad))) return false;
    }
  }
  return true;
}

// Runs one(q, state) -> done over the queries on the pool, with the budget and give-up rule of
// `in`; finish(q, state) takes the candidates of a finished query.
template <class One, class Finish>
void run_queries(const MihTables& t, const MihQuery& in, int64_t k, uint8_t* done,
                 MihStats* stats, One one, Finish finish) {
  if (!scalar_supported())
    throw std::runtime_error("multi-index hashing needs a CPU with POPCNT");
  std::atomic<int64_t> finished{0}, probes{0}, entries{0}, aborted{0}, given_up{0};
  std::atomic<int64_t> spent_probing{0};  // probing cost of all queries, whole units
  std::atomic<int64_t> spent{0};  // cost of the finished queries, whole units
  std::atomic<bool> stop{false};
  const int threads = static_cast<int>(
      std::min<int64_t>(in.nq, in.num_threads > 0 ? in.num_threads : hardware_threads()));
  run_parallel(std::max(1, threads), in.nq, [&](const auto& claim) {
    Scratch s(t);
    for (int64_t i; (i = claim()) >= 0;) {
      done[i] = 0;
      if (stop.load(std::memory_order_relaxed)) {
        ++given_up;
        continue;
      }
      const uint64_t* q = in.q + i * t.W;
      const uint64_t* m =
          in.mask ? in.mask + (in.mask_rows == 1 ? 0 : i * t.W) : nullptr;
      const int np = plan_probes(t, q, m, s);
      QueryState st{t, q, m, s, k, ~uint64_t(0), k > 0 ? 2 * k + 256 : int64_t(1) << 62,
                    in.budget};
      s.cand.clear();
      const bool ok = one(st, np);
      if (ok) finish(i, st);
      s.clear_seen();
      done[i] = ok ? 1 : 0;
      probes += st.probes;
      entries += st.entries;
      aborted += st.over ? 1 : 0;
      spent_probing += static_cast<int64_t>(st.cost);
      const int64_t f = ++finished;
      const int64_t c = spent += static_cast<int64_t>(st.cost + (ok ? 0 : in.scan_cost));
      // the average over at least 16 queries: a few aborted queries (each a budget plus a scan)
      // stop a small batch too, while one unlucky query among the first does not
      if (in.give_up > 0 && c > in.give_up * in.scan_cost * std::max<int64_t>(f, 16))
        stop.store(true);
    }
  });
  if (stats) {
    stats->probes = probes.load();
    stats->entries = entries.load();
    stats->aborted = aborted.load();
    stats->given_up = given_up.load();
    stats->cost = static_cast<double>(spent_probing.load());
    int64_t nd = 0;
    for (int64_t i = 0; i < in.nq; ++i) nd += done[i] == 0;
    stats->not_done = nd;
  }
}

}  // namespace

void mih_topk(const MihTables& t, const MihQuery& in, int64_t k, int32_t* out_d, int64_t* out_i,
              uint8_t* done, MihStats* stats) {
  auto one = [&](QueryState& st, int np) { return topk_one(st, np); };
  auto finish = [&](int64_t q, QueryState& st) {
    st.compact();
    std::sort(st.s.cand.begin(), st.s.cand.end());
    for (int64_t j = 0; j < k; ++j) {
      const uint64_t key = st.s.cand[static_cast<size_t>(j)];
      out_d[q * k + j] = static_cast<int32_t>(key >> kIndexBits);
      out_i[q * k + j] = static_cast<int64_t>(key & kIndexMask);
    }
  };
  run_queries(t, in, k, done, stats, one, finish);
}

void mih_radius(const MihTables& t, const MihQuery& in, int64_t r, int64_t* lims,
                std::vector<int32_t>* out_d, std::vector<int64_t>* out_i, uint8_t* done,
                MihStats* stats) {
  r = std::min<int64_t>(r, t.bits);  // r >= bits: every code
  std::vector<std::vector<uint64_t>> part(static_cast<size_t>(in.nq));
  // keys of distance <= r are below this threshold (positions < 2^40)
  const uint64_t thr = (static_cast<uint64_t>(r) + 1) << kIndexBits;
  auto one = [&](QueryState& st, int np) {
    st.thr = thr;
    return radius_one(st, np, r);
  };
  auto finish = [&](int64_t q, QueryState& st) {
    std::sort(st.s.cand.begin(), st.s.cand.end());
    part[static_cast<size_t>(q)] = st.s.cand;
  };
  run_queries(t, in, 0, done, stats, one, finish);
  lims[0] = 0;
  for (int64_t q = 0; q < in.nq; ++q)
    lims[q + 1] = lims[q] + static_cast<int64_t>(part[static_cast<size_t>(q)].size());
  out_d->resize(static_cast<size_t>(lims[in.nq]));
  out_i->resize(static_cast<size_t>(lims[in.nq]));
  for (int64_t q = 0; q < in.nq; ++q) {
    int64_t o = lims[q];
    for (uint64_t key : part[static_cast<size_t>(q)]) {
      (*out_d)[static_cast<size_t>(o)] = static_cast<int32_t>(key >> kIndexBits);
      (*out_i)[static_cast<size_t>(o)] = static_cast<int64_t>(key & kIndexMask);
      ++o;
    }
    std::vector<uint64_t>().swap(part[static_cast<size_t>(q)]);
  }
}

}  // namespace fasthash

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC pop_options
#endif
