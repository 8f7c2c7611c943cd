// Multi-index hashing: building the tables (see fasthash/mih.h for the layout).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "fasthash/mih.h"
#include "fasthash/mih_detail.h"
#include "fasthash/pool.h"
#include "fasthash/search.h"

namespace fasthash {

int64_t MihTables::nbytes() const {
  int64_t b = 0;
  for (const MihTable& t : tables)
    b += n * stride + static_cast<int64_t>(t.dir.size() * 4 + t.keys.size() * 8 + t.off.size() * 4);
  return b;
}

namespace {

// Directory bits of a table: all of them when dense, else about log2(n) + 1 (<= 24) top bits.
int directory_bits(int len, int64_t n) {
  int lg = 1;
  while (lg < 62 && (int64_t(1) << lg) < n) ++lg;
  if (len <= kMihDenseBits && (int64_t(1) << len) <= 8 * n + 65536) return len;
  return std::min({len, kMihDenseBits, lg + 1});
}

void write_entry(unsigned char* dst, const uint64_t* code, int64_t W, uint32_t pos) {
  std::memcpy(dst, code, static_cast<size_t>(W) * 8);
  std::memcpy(dst + W * 8, &pos, 4);
}

// Sorts the entries of one top bucket [b, e) by their full substring value and appends the
// distinct values (and their entry offsets) to the table.
void sort_top_bucket(MihTable& t, int64_t W, int64_t stride, uint32_t b, uint32_t e,
                     std::vector<std::pair<uint64_t, uint32_t>>* order,
                     std::vector<unsigned char>* tmp) {
  unsigned char* base = t.entries.get();
  order->clear();
  for (uint32_t i = b; i < e; ++i)
    order->emplace_back(mih_extract_entry(base + static_cast<int64_t>(i) * stride, t.start, t.len, W), i);
  std::sort(order->begin(), order->end());
  tmp->resize(static_cast<size_t>(static_cast<int64_t>(e - b) * stride));
  for (size_t j = 0; j < order->size(); ++j)
    std::memcpy(tmp->data() + j * stride, base + static_cast<int64_t>((*order)[j].second) * stride,
                static_cast<size_t>(stride));
  std::memcpy(base + static_cast<int64_t>(b) * stride, tmp->data(), tmp->size());
  for (size_t j = 0; j < order->size(); ++j) {
    if (j == 0 || (*order)[j].first != (*order)[j - 1].first) {
      t.keys.push_back((*order)[j].first);
      t.off.push_back(b + static_cast<uint32_t>(j));
    }
  }
}

// One table: counting sort of the n codes by their top directory bits, then (sparse) a sort of
// each top bucket and its distinct keys.
void build_table(const uint64_t* x, int64_t n, int64_t W, int64_t stride, MihTable& t) {
  const int shift = t.len - t.top_bits;
  const size_t nb = size_t(1) << t.top_bits;
  std::vector<uint32_t> cursor(nb + 1, 0);
  for (int64_t i = 0; i < n; ++i) cursor[(mih_extract(x + i * W, t.start, t.len, W) >> shift) + 1]++;
  for (size_t b = 0; b < nb; ++b) cursor[b + 1] += cursor[b];
  t.dir = cursor;
  t.entries.reset(new unsigned char[static_cast<size_t>(std::max<int64_t>(1, n * stride))]);
  unsigned char* base = t.entries.get();
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t* code = x + i * W;
    const uint32_t p = cursor[mih_extract(code, t.start, t.len, W) >> shift]++;
    write_entry(base + static_cast<int64_t>(p) * stride, code, W, static_cast<uint32_t>(i));
  }
  if (shift == 0) return;
  // sparse: dir becomes offsets into the distinct keys of each top bucket
  std::vector<uint32_t> entry_dir;
  entry_dir.swap(t.dir);
  t.dir.assign(nb + 1, 0);
  std::vector<std::pair<uint64_t, uint32_t>> order;
  std::vector<unsigned char> tmp;
  for (size_t b = 0; b < nb; ++b) {
    t.dir[b] = static_cast<uint32_t>(t.keys.size());
    if (entry_dir[b + 1] > entry_dir[b])
      sort_top_bucket(t, W, stride, entry_dir[b], entry_dir[b + 1], &order, &tmp);
  }
  t.dir[nb] = static_cast<uint32_t>(t.keys.size());
  t.off.push_back(static_cast<uint32_t>(n));
  t.keys.shrink_to_fit();
  t.off.shrink_to_fit();
}

}  // namespace

void mih_build(const uint64_t* x, int64_t n, int64_t W, int64_t bits, int m, int num_threads,
               MihTables* out) {
  if (m < 1 || m > bits || (bits + m - 1) / m > kMihMaxBits)
    throw std::invalid_argument("num_tables must satisfy ceil(bits / 64) <= num_tables <= bits");
  if (n < 0 || n >= int64_t(0xFFFFFFFF))
    throw std::invalid_argument("multi-index hashing holds fewer than 2^32 - 1 codes");
  out->n = n;
  out->W = W;
  out->bits = bits;
  out->stride = 8 * W + 4;
  out->tables.clear();
  out->tables.resize(static_cast<size_t>(m));
  int64_t at = 0;
  for (int j = 0; j < m; ++j) {
    MihTable& t = out->tables[static_cast<size_t>(j)];
    // the first bits % m substrings get one bit more
    t.len = static_cast<int>(bits / m + (j < bits % m ? 1 : 0));
    t.start = static_cast<int>(at);
    at += t.len;
    t.top_bits = directory_bits(t.len, n);
  }
  const int threads = std::min(m, num_threads > 0 ? num_threads : hardware_threads());
  run_parallel(threads, m, [&](const auto& claim) {
    for (int64_t j; (j = claim()) >= 0;)
      build_table(x, n, W, out->stride, out->tables[static_cast<size_t>(j)]);
  });
}

}  // namespace fasthash
