// pybind11 bindings of fasthash._C: numpy buffers in and out, the GIL released while computing.
//
// fasthash/search.py validates user input first, with the messages users read. The checks here
// only keep the engine's memory accesses in bounds for any caller, so each is one line through
// check(): "fasthash._C.<fn>: <arg> must be <what>".
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fasthash/mih.h"
#include "fasthash/search.h"
#include "fasthash/simd_table.h"

namespace py = pybind11;

namespace fasthash {
namespace {

enum class Err { Value, Type };

void check(bool ok, const char* fn, const std::string& what, Err kind = Err::Value) {
  if (ok) return;
  const std::string msg = std::string("fasthash._C.") + fn + ": " + what;
  if (kind == Err::Type) throw py::type_error(msg);
  throw py::value_error(msg);
}

std::string supported_names() {
  std::string out;
  for (const SimdLevel& row : kSimdLevels) {
    if (!row.supported()) continue;
    if (!out.empty()) out += ", ";
    out += row.name;
  }
  return out;
}

// The level in use: FASTHASH_SIMD if set, else the best the CPU has; set_simd_level() changes it.
// A bad FASTHASH_SIMD is kept as an error raised by every call that would use it.
struct SimdState {
  Simd level = Simd::Scalar;
  std::string error;
};

SimdState init_simd_state() {
  SimdState st;
  st.level = best_simd();
  const char* env = std::getenv("FASTHASH_SIMD");
  if (env == nullptr || *env == '\0') return st;
  Simd s;
  if (!parse_simd(env, &s))
    st.error = "FASTHASH_SIMD must be one of " + simd_names() + " (got '" + env + "')";
  else if (!simd_supported(s))
    st.error = "FASTHASH_SIMD must be a level this CPU supports: " + supported_names();
  else
    st.level = s;
  return st;
}

SimdState& simd_state() {
  static SimdState st = init_simd_state();
  return st;
}

// name "" = the level in use.
Simd resolve_simd(const char* fn, const char* arg, const std::string& name) {
  if (name.empty()) {
    const SimdState& st = simd_state();
    check(st.error.empty(), fn, st.error);
    return st.level;
  }
  Simd s;
  check(parse_simd(name, &s), fn, std::string(arg) + " must be one of " + simd_names());
  check(simd_supported(s), fn, std::string(arg) + " must be a level this CPU supports: " +
                                   supported_names());
  return s;
}

struct Words {
  const uint64_t* ptr;
  int64_t rows;
  int64_t words;
};

// A C-contiguous native uint64 array of ndim 1 or 2 (as [1, W] when 1-D).
Words words(const py::object& a, const char* fn, const char* arg, bool allow_1d = false) {
  const std::string name(arg);
  check(py::isinstance<py::array_t<uint64_t>>(a), fn, name + " must be a uint64 numpy array",
        Err::Type);
  const auto arr = py::reinterpret_borrow<py::array>(a);
  check(arr.ndim() == 2 || (allow_1d && arr.ndim() == 1), fn,
        name + (allow_1d ? " must be 1-D [W] or 2-D [rows, W]" : " must be 2-D [rows, W]"));
  check((arr.flags() & py::array::c_style) != 0, fn, name + " must be C-contiguous");
  if (arr.ndim() == 1) return {static_cast<const uint64_t*>(arr.data()), 1, arr.shape(0)};
  return {static_cast<const uint64_t*>(arr.data()), arr.shape(0), arr.shape(1)};
}

// The checks every entry point needs; an empty gallery is the caller's to reject or allow.
SearchInput make_input(const char* fn, const py::object& queries, const py::object& gallery,
                       const py::object& mask, int num_threads, const std::string& simd) {
  const Words q = words(queries, fn, "queries");
  const Words x = words(gallery, fn, "gallery");
  check(q.words >= 1, fn, "queries must have at least one word per row");
  check(x.words == q.words, fn, "gallery must have as many words per row as queries");
  check(q.words <= (int64_t(1) << 20) / 64, fn, "codes must have at most 2^20 bits");
  check(x.rows <= static_cast<int64_t>(kIndexMask), fn, "gallery must have fewer than 2^40 rows");
  SearchInput in;
  in.q = q.ptr;
  in.nq = q.rows;
  in.x = x.ptr;
  in.nx = x.rows;
  in.W = q.words;
  if (!mask.is_none()) {
    const Words m = words(mask, fn, "mask", true);
    check(m.words == in.W && (m.rows == 1 || m.rows == in.nq), fn,
          "mask must be [W], [1, W] or [Q, W] with the words of queries");
    in.mask = m.ptr;
    in.mask_rows = m.rows == 1 ? 1 : in.nq;
  }
  check(num_threads >= 0 && num_threads <= kMaxThreads, fn,
        "num_threads must satisfy 0 <= num_threads <= " + std::to_string(kMaxThreads) +
            " (0: all cores)");
  in.num_threads = num_threads;
  in.simd = resolve_simd(fn, "simd", simd);
  return in;
}

// top-k and radius collect (distance, index) candidates: they need at least one gallery code.
SearchInput search_input(const char* fn, const py::object& queries, const py::object& gallery,
                         const py::object& mask, int num_threads, const std::string& simd) {
  SearchInput in = make_input(fn, queries, gallery, mask, num_threads, simd);
  check(in.nx >= 1, fn, "gallery must have at least one row");
  return in;
}

py::tuple topk(const py::object& queries, const py::object& gallery, int64_t k,
               const py::object& mask, int num_threads, const std::string& simd) {
  const SearchInput in = search_input("topk", queries, gallery, mask, num_threads, simd);
  check(k >= 1 && k <= in.nx, "topk", "k must satisfy 1 <= k <= gallery rows");
  py::array_t<int32_t> d({in.nq, k});
  py::array_t<int64_t> i({in.nq, k});
  int32_t* dp = d.mutable_data();
  int64_t* ip = i.mutable_data();
  if (in.nq > 0) {
    py::gil_scoped_release release;
    topk_search(in, k, dp, ip);
  }
  return py::make_tuple(d, i);
}

py::tuple radius(const py::object& queries, const py::object& gallery, int64_t r,
                 const py::object& mask, int num_threads, const std::string& simd) {
  const SearchInput in = search_input("radius", queries, gallery, mask, num_threads, simd);
  check(r >= 0, "radius", "r must be >= 0");
  py::array_t<int64_t> lims(in.nq + 1);
  int64_t* lp = lims.mutable_data();
  std::vector<int32_t> dv;
  std::vector<int64_t> iv;
  if (in.nq > 0) {
    py::gil_scoped_release release;
    radius_search(in, r, lp, &dv, &iv);
  } else {
    lp[0] = 0;
  }
  py::array_t<int32_t> d(static_cast<py::ssize_t>(dv.size()));
  py::array_t<int64_t> i(static_cast<py::ssize_t>(iv.size()));
  if (!dv.empty()) {
    std::memcpy(d.mutable_data(), dv.data(), dv.size() * sizeof(int32_t));
    std::memcpy(i.mutable_data(), iv.data(), iv.size() * sizeof(int64_t));
  }
  return py::make_tuple(lims, d, i);
}

py::array_t<int32_t> hamming_distances(const py::object& queries, const py::object& gallery,
                                       const py::object& mask, int num_threads,
                                       const std::string& simd) {
  const SearchInput in =
      make_input("hamming_distances", queries, gallery, mask, num_threads, simd);
  py::array_t<int32_t> out({in.nq, in.nx});
  int32_t* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    distance_matrix(in, op);
  }
  return out;
}

void set_simd_level(const std::string& name) {
  SimdState& st = simd_state();
  st.level = name.empty() || name == "auto" ? best_simd()
                                            : resolve_simd("set_simd_level", "name", name);
  st.error.clear();
}

std::vector<std::string> available_simd_levels() {
  std::vector<std::string> out;
  for (const SimdLevel& row : kSimdLevels)
    if (row.supported()) out.emplace_back(row.name);
  return out;
}

// ---- multi-index hashing: fasthash/mih.py validates user input; these checks keep memory
// accesses in bounds for any caller.

std::shared_ptr<MihTables> mih_new(const py::object& gallery, int64_t bits, int num_tables,
                                   int num_threads) {
  const char* fn = "MIHTables";
  const Words x = words(gallery, fn, "gallery");
  check(bits >= 1 && bits <= (int64_t(1) << 20), fn, "bits must satisfy 1 <= bits <= 2^20");
  check(x.words == (bits + 63) / 64, fn, "gallery must have ceil(bits / 64) words per row");
  check(num_tables >= 1 && num_tables <= bits && (bits + num_tables - 1) / num_tables <= kMihMaxBits,
        fn, "num_tables must satisfy ceil(bits / 64) <= num_tables <= bits");
  check(x.rows < int64_t(0xFFFFFFFF), fn, "gallery must have fewer than 2^32 - 1 rows");
  check(num_threads >= 0 && num_threads <= kMaxThreads, fn, "num_threads must be in [0, 1024]");
  auto t = std::make_shared<MihTables>();
  py::gil_scoped_release release;
  mih_build(x.ptr, x.rows, x.words, bits, num_tables, num_threads, t.get());
  return t;
}

// Without an explicit budget a query may probe for 4 scans of itself (then the caller scans
// it): an unlimited probe of a large radius can take practically forever.
constexpr double kMihDefaultBudgetScans = 4.0;

MihQuery mih_query(const MihTables& t, const char* fn, const py::object& queries,
                   const py::object& mask, std::optional<double> budget, double give_up,
                   int num_threads) {
  const Words q = words(queries, fn, "queries");
  check(q.words == t.W, fn, "queries must have the tables' words per row");
  MihQuery in;
  in.q = q.ptr;
  in.nq = q.rows;
  if (!mask.is_none()) {
    const Words m = words(mask, fn, "mask", true);
    check(m.words == t.W && (m.rows == 1 || m.rows == in.nq), fn,
          "mask must be [W], [1, W] or [Q, W] with the words of queries");
    in.mask = m.ptr;
    in.mask_rows = m.rows == 1 ? 1 : in.nq;
  }
  check(num_threads >= 0 && num_threads <= kMaxThreads, fn, "num_threads must be in [0, 1024]");
  in.num_threads = num_threads;
  in.give_up = give_up;
  in.scan_cost = static_cast<double>(t.n) * static_cast<double>(t.W);
  check(!budget || *budget > 0, fn, "budget must be > 0 (math.inf: unlimited) or None");
  in.budget = budget ? *budget : kMihDefaultBudgetScans * in.scan_cost;
  if (std::isinf(in.budget)) in.budget = 0;  // unlimited
  return in;
}

py::dict mih_stats(const MihStats& st) {
  py::dict d;
  d["probes"] = st.probes;
  d["entries"] = st.entries;
  d["not_done"] = st.not_done;
  d["aborted"] = st.aborted;
  d["given_up"] = st.given_up;
  d["cost"] = st.cost;
  return d;
}

py::tuple mih_topk_py(const MihTables& t, const py::object& queries, int64_t k,
                      const py::object& mask, std::optional<double> budget, double give_up,
                      int num_threads) {
  const MihQuery in = mih_query(t, "MIHTables.topk", queries, mask, budget, give_up, num_threads);
  check(k >= 1 && k <= t.n, "MIHTables.topk", "k must satisfy 1 <= k <= rows");
  py::array_t<int32_t> d({in.nq, k});
  py::array_t<int64_t> i({in.nq, k});
  py::array_t<uint8_t> done(in.nq);
  int32_t* dp = d.mutable_data();
  int64_t* ip = i.mutable_data();
  uint8_t* op = done.mutable_data();
  MihStats st;
  if (in.nq > 0) {
    py::gil_scoped_release release;
    mih_topk(t, in, k, dp, ip, op, &st);
  }
  return py::make_tuple(d, i, done.attr("astype")("bool"), mih_stats(st));
}

py::tuple mih_radius_py(const MihTables& t, const py::object& queries, int64_t r,
                        const py::object& mask, std::optional<double> budget, double give_up,
                      int num_threads) {
  const MihQuery in =
      mih_query(t, "MIHTables.radius", queries, mask, budget, give_up, num_threads);
  check(r >= 0, "MIHTables.radius", "r must be >= 0");
  check(t.n >= 1, "MIHTables.radius", "the tables must hold at least one code");
  py::array_t<int64_t> lims(in.nq + 1);
  py::array_t<uint8_t> done(in.nq);
  int64_t* lp = lims.mutable_data();
  uint8_t* op = done.mutable_data();
  std::vector<int32_t> dv;
  std::vector<int64_t> iv;
  MihStats st;
  lp[0] = 0;
  if (in.nq > 0) {
    py::gil_scoped_release release;
    mih_radius(t, in, r, lp, &dv, &iv, op, &st);
  }
  py::array_t<int32_t> d(static_cast<py::ssize_t>(dv.size()));
  py::array_t<int64_t> i(static_cast<py::ssize_t>(iv.size()));
  if (!dv.empty()) {
    std::memcpy(d.mutable_data(), dv.data(), dv.size() * sizeof(int32_t));
    std::memcpy(i.mutable_data(), iv.data(), iv.size() * sizeof(int64_t));
  }
  return py::make_tuple(lims, d, i, done.attr("astype")("bool"), mih_stats(st));
}

std::vector<int> mih_table_bits(const MihTables& t) {
  std::vector<int> out;
  for (const MihTable& tb : t.tables) out.push_back(tb.len);
  return out;
}

void bind_mih(py::module_& m) {
  py::class_<MihTables, std::shared_ptr<MihTables>>(
      m, "MIHTables",
      "Multi-index hashing tables over packed codes (csrc/include/fasthash/mih.h); built from "
      "a gallery [N, W], which they copy (m (8 W + 4) bytes per code + directories).")
      .def(py::init(&mih_new), py::arg("gallery"), py::arg("bits"), py::arg("num_tables"),
           py::arg("num_threads") = 0)
      .def("topk", &mih_topk_py, py::arg("queries"), py::arg("k"), py::arg("mask") = py::none(),
           py::arg("budget") = py::none(), py::arg("give_up") = 0.0, py::arg("num_threads") = 0,
           "Exact top-k: (int32 d [Q, k], int64 positions [Q, k], bool done [Q], stats dict: "
           "probes, entries, not_done, aborted, given_up, cost); rows of queries not done are "
           "unspecified. budget: per-query cost limit in scan units (N W per query scanned), "
           "> 0; None (default): 4 scans; math.inf: unlimited (a large k or radius can then "
           "run practically forever). A query stops before a bucket read would pass it. "
           "give_up > 0: stop probing once the cost of finished queries (aborted ones + one "
           "scan) passes give_up * max(finished, 16) scans.")
      .def("radius", &mih_radius_py, py::arg("queries"), py::arg("r"),
           py::arg("mask") = py::none(), py::arg("budget") = py::none(),
           py::arg("give_up") = 0.0, py::arg("num_threads") = 0,
           "Radius search: (lims, d, positions, bool done [Q], stats); queries not done have no "
           "results. budget, give_up: as in topk.")
      .def_property_readonly("n", [](const MihTables& t) { return t.n; })
      .def_property_readonly("bits", [](const MihTables& t) { return t.bits; })
      .def_property_readonly("num_tables",
                             [](const MihTables& t) { return static_cast<int>(t.tables.size()); })
      .def_property_readonly("table_bits", &mih_table_bits)
      .def_property_readonly("nbytes", &MihTables::nbytes);
  m.attr("MIH_PROBE_COST") = kMihProbeCost;
  m.attr("MIH_ENTRY_COST") = kMihEntryCost;
  m.attr("MIH_MAX_WILDCARDS") = kMihMaxWildcards;
}

}  // namespace
}  // namespace fasthash

PYBIND11_MODULE(_C, m) {
  using namespace fasthash;
  m.doc() = "fasthash compiled core: exact Hamming search over packed uint64 codes";
  m.def("hamming_distances", &hamming_distances, py::arg("queries"), py::arg("gallery"),
        py::arg("mask") = py::none(), py::arg("num_threads") = 0, py::arg("simd") = "",
        "All-pairs (masked) Hamming distances of packed uint64 codes [Q, W] x [N, W] -> int32 "
        "[Q, N]: D[i, j] = popcount((q_i ^ x_j) & m_i). mask: None, [W] or [Q, W] uint64. "
        "num_threads 0 = all cores. simd '' = the level in use. Q = 0 or N = 0 give an empty "
        "array.");
  m.def("topk", &topk, py::arg("queries"), py::arg("gallery"), py::arg("k"),
        py::arg("mask") = py::none(), py::arg("num_threads") = 0, py::arg("simd") = "",
        "Exact top-k: (int32 distances [Q, k], int64 indices [Q, k]) ordered by (distance, "
        "index). mask: None, [W] or [Q, W] uint64. num_threads 0 = all cores. simd '' = the "
        "level in use.");
  m.def("radius", &radius, py::arg("queries"), py::arg("gallery"), py::arg("r"),
        py::arg("mask") = py::none(), py::arg("num_threads") = 0, py::arg("simd") = "",
        "Radius search: (int64 lims [Q+1], int32 distances, int64 indices), FAISS style.");
  m.def("simd_level", []() { return std::string(simd_name(resolve_simd("simd_level", "", ""))); },
        "SIMD level in use (FASTHASH_SIMD or set_simd_level override the CPUID choice).");
  m.def("set_simd_level", &set_simd_level, py::arg("name"),
        "Force a SIMD level (a name from available_simd_levels(), or 'auto').");
  m.def("available_simd_levels", &available_simd_levels,
        "SIMD levels this CPU supports, slowest first.");
  m.def("hardware_threads", &hardware_threads, "Threads used when num_threads is 0.");
  m.attr("MAX_THREADS") = kMaxThreads;
  bind_mih(m);
}
