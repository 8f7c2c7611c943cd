// Exact multi-index hashing (Norouzi, Punjani & Fleet, "Fast Exact Search in Hamming Space
// with Multi-Index Hashing", TPAMI 2014): the tables, their build and the k-NN / radius search.
//
// A code of L bits is cut into m contiguous substrings (bits [start_j, start_j + len_j), lengths
// differing by at most one, each <= 64 bits). Table j groups the N codes by the value of their
// substring j. Pigeonhole: if popcount((q ^ x) & mask) <= R over the substrings of a set S of
// tables, then some table j in S has a substring distance <= floor(R / |S|). The finer per-table
// form used here: once tables S[0..jj] are probed through radius r and the other tables of S
// through r - 1, every code with distance <= |S| r + jj has been seen.
//
// Memory layout: a table is the N entries sorted by substring value, each entry a copy of the
// code's W words followed by its u32 position (stride 8 W + 4 bytes, unaligned loads), so a
// probe reads one bucket sequentially; plus a bucket directory. Substrings of <= 24 bits (and
// at most ~8 N buckets) use a dense directory of 2^len + 1 u32 offsets; longer ones a dense
// directory over their top bits pointing into sorted distinct keys (binary search) with u32
// offsets. Memory per code: m (8 W + 4) bytes, plus 4 (2^len + 1) bytes per dense table or
// <= 12 bytes per distinct key (+ 4 (2^top + 1)) per sparse one.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace fasthash {

constexpr int kMihMaxBits = 64;       // longest substring
constexpr int kMihDenseBits = 24;     // longest substring with a dense directory
constexpr int kMihMaxWildcards = 10;  // masked-out bits a table may have and still be probed
// Cost model of the candidate budget, in units of one 64-bit word distance in the batched
// linear scan (its cost per query is N W units): one bucket probe (directory + bucket start,
// usually two cache misses) and one bucket entry (de-duplication bit + distance).
constexpr double kMihProbeCost = 1500.0;
constexpr double kMihEntryCost = 60.0;

struct MihTable {
  int start = 0;     // first bit of the substring
  int len = 0;       // substring bits, 1..64
  int top_bits = 0;  // directory bits; == len for a dense table
  std::vector<uint32_t> dir;   // [2^top_bits + 1]: entry offsets (dense) or key offsets (sparse)
  std::vector<uint64_t> keys;  // sparse: distinct substring values, sorted
  std::vector<uint32_t> off;   // sparse: [keys + 1] entry offsets
  std::unique_ptr<unsigned char[]> entries;  // n entries of stride 8 W + 4
};

struct MihTables {
  int64_t n = 0;
  int64_t W = 0;
  int64_t bits = 0;
  int64_t stride = 0;  // bytes per entry
  std::vector<MihTable> tables;

  // Bytes held by the tables (entries + directories + keys).
  int64_t nbytes() const;
};

// Builds m tables over the row-major codes x [n, W] (n < 2^32 - 1, bits beyond `bits` zero),
// one table per pool task, each by a counting sort on the substring value (sparse tables:
// counting sort on the top bits, then a sort of each small top bucket).
void mih_build(const uint64_t* x, int64_t n, int64_t W, int64_t bits, int m, int num_threads,
               MihTables* out);

struct MihQuery {
  const uint64_t* q = nullptr;  // [nq, W]
  int64_t nq = 0;
  const uint64_t* mask = nullptr;  // nullptr, one row (mask_rows = 1) or [nq, W]
  int64_t mask_rows = 0;
  int num_threads = 0;
  // Per-query cost limit in scan units (see kMihProbeCost); <= 0: unlimited. A query stops
  // (reported not done: the caller scans it) before a probe or a bucket read would exceed it,
  // so its probing never costs more than the budget plus one probe.
  double budget = 0;
  // > 0: give up on the remaining queries (not done, left to the scan) once the cost of the
  // finished queries -- a finished query its probing, an aborted one its probing plus one
  // scan (scan_cost) -- exceeds give_up * scan_cost * max(finished, 16): the scan is then
  // cheaper (a small batch stops once its aborted queries cost 16 * give_up scans).
  double give_up = 0;
  double scan_cost = 0;  // cost of scanning one query (N W units)
};

struct MihStats {
  int64_t probes = 0;    // buckets looked up
  int64_t entries = 0;   // bucket entries read
  int64_t not_done = 0;  // queries left to the scan (aborted, given up or no usable table)
  int64_t aborted = 0;   // queries stopped by their budget
  int64_t given_up = 0;  // queries not probed at all (give_up)
  double cost = 0;       // probing cost of all queries, in scan units
};

// Exact top-k of each query: out_d [nq, k], out_i [nq, k] (positions), ordered by
// (distance, position); done[q] = 0 for a query MIH did not finish (its rows are unspecified):
// the budget ran out, it was given up (give_up), or its mask leaves no table with at most
// kMihMaxWildcards masked-out substring bits.
void mih_topk(const MihTables& t, const MihQuery& in, int64_t k, int32_t* out_d, int64_t* out_i,
              uint8_t* done, MihStats* stats);

// Every code within distance r of each query: lims [nq + 1], out_d / out_i as hamming_radius,
// ordered by (distance, position); a query with done[q] = 0 gets no results.
void mih_radius(const MihTables& t, const MihQuery& in, int64_t r, int64_t* lims,
                std::vector<int32_t>* out_d, std::vector<int64_t>* out_i, uint8_t* done,
                MihStats* stats);

}  // namespace fasthash
