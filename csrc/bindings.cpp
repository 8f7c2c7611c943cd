// pybind11 bindings of fasthash._C: numpy buffers in and out, checks with clear messages,
// the GIL released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "fasthash/search.h"

namespace py = pybind11;

namespace fasthash {
namespace {

// The level in use: FASTHASH_SIMD if set, else the best the CPU has; set_simd_level() changes it.
struct SimdState {
  bool resolved = false;
  Simd level = Simd::Scalar;
  std::string error;
};
SimdState& simd_state() {
  static SimdState st;
  if (!st.resolved) {
    st.resolved = true;
    st.level = best_simd();
    const char* env = std::getenv("FASTHASH_SIMD");
    if (env && *env) {
      Simd s;
      if (!parse_simd(env, &s)) {
        st.error = std::string("FASTHASH_SIMD must be one of scalar, avx2, avx512, got '") + env +
                   "'";
      } else if (!simd_supported(s)) {
        st.error = std::string("FASTHASH_SIMD=") + env + " is not supported by this CPU";
      } else {
        st.level = s;
      }
    }
  }
  return st;
}

Simd resolve_simd(const std::string& name) {
  if (name.empty()) {
    SimdState& st = simd_state();
    if (!st.error.empty()) throw py::value_error(st.error);
    return st.level;
  }
  Simd s;
  if (!parse_simd(name, &s))
    throw py::value_error("simd must be one of 'scalar', 'avx2', 'avx512', got '" + name + "'");
  if (!simd_supported(s)) throw py::value_error("simd='" + name + "' is not supported by this CPU");
  return s;
}

py::buffer_info check_words(const py::array& a, const char* name) {
  if (a.dtype().kind() != 'u' || a.itemsize() != 8)
    throw py::type_error(std::string(name) + " must be a uint64 array of packed words, got dtype " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != 2)
    throw py::value_error(std::string(name) + " must be 2-D [rows, words], got ndim " +
                          std::to_string(a.ndim()));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
  return a.request();
}

SearchInput make_input(const py::array& queries, const py::array& gallery, const py::object& mask,
                       int num_threads, const std::string& simd) {
  auto qb = check_words(queries, "queries");
  auto xb = check_words(gallery, "gallery");
  SearchInput in;
  in.W = qb.shape[1];
  if (in.W < 1) throw py::value_error("queries must have at least one word per row");
  if (xb.shape[1] != in.W)
    throw py::value_error("gallery must have the same number of words per code as queries (" +
                          std::to_string(in.W) + "), got " + std::to_string(xb.shape[1]));
  if (in.W > (int64_t(1) << 20) / 64)
    throw py::value_error("codes must have at most 2^20 bits");
  in.nq = qb.shape[0];
  in.nx = xb.shape[0];
  if (in.nx < 1) throw py::value_error("gallery must contain at least one code");
  if (in.nx > static_cast<int64_t>(kIndexMask))
    throw py::value_error("gallery must hold fewer than 2^40 codes");
  in.q = static_cast<const uint64_t*>(qb.ptr);
  in.x = static_cast<const uint64_t*>(xb.ptr);
  if (!mask.is_none()) {
    py::array m = py::reinterpret_borrow<py::array>(mask);
    if (!py::isinstance<py::array>(mask)) throw py::type_error("mask must be a numpy array or None");
    if (m.dtype().kind() != 'u' || m.itemsize() != 8)
      throw py::type_error("mask must be uint64 packed words, got dtype " +
                           std::string(py::str(m.dtype())));
    if (!(m.flags() & py::array::c_style)) throw py::value_error("mask must be C-contiguous");
    if (m.ndim() == 1) {
      if (m.shape(0) != in.W)
        throw py::value_error("mask must have " + std::to_string(in.W) + " words, got " +
                              std::to_string(m.shape(0)));
      in.mask_rows = 1;
    } else if (m.ndim() == 2) {
      if (m.shape(1) != in.W)
        throw py::value_error("mask must have " + std::to_string(in.W) + " words per row, got " +
                              std::to_string(m.shape(1)));
      if (m.shape(0) != 1 && m.shape(0) != in.nq)
        throw py::value_error("mask must be one mask [W] or one per query [" +
                              std::to_string(in.nq) + ", W], got " + std::to_string(m.shape(0)) +
                              " rows");
      in.mask_rows = m.shape(0) == 1 ? 1 : in.nq;
    } else {
      throw py::value_error("mask must be 1-D [W] or 2-D [Q, W]");
    }
    in.mask = static_cast<const uint64_t*>(m.data());
  }
  if (num_threads < 0) throw py::value_error("num_threads must be >= 1 (or 0 for all cores)");
  in.num_threads = num_threads;
  in.simd = resolve_simd(simd);
  return in;
}

py::tuple topk(const py::array& queries, const py::array& gallery, int64_t k, const py::object& mask,
               int num_threads, const std::string& simd) {
  SearchInput in = make_input(queries, gallery, mask, num_threads, simd);
  if (k < 1 || k > in.nx)
    throw py::value_error("k must satisfy 1 <= k <= N = " + std::to_string(in.nx) + ", got " +
                          std::to_string(k));
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

py::tuple radius(const py::array& queries, const py::array& gallery, int64_t r,
                 const py::object& mask, int num_threads, const std::string& simd) {
  SearchInput in = make_input(queries, gallery, mask, num_threads, simd);
  if (r < 0) throw py::value_error("r must be a non-negative integer, got " + std::to_string(r));
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

py::array_t<int32_t> hamming_distances(const py::array& queries, const py::array& gallery) {
  auto qb = check_words(queries, "queries");
  auto xb = check_words(gallery, "gallery");
  if (qb.shape[1] != xb.shape[1])
    throw py::value_error("gallery must have the same number of words as queries (" +
                          std::to_string(qb.shape[1]) + "), got " + std::to_string(xb.shape[1]));
  const int64_t nq = qb.shape[0], nx = xb.shape[0], words = qb.shape[1];
  py::array_t<int32_t> out({nq, nx});
  int32_t* o = out.mutable_data();
  const auto* q = static_cast<const uint64_t*>(qb.ptr);
  const auto* x = static_cast<const uint64_t*>(xb.ptr);
  {
    py::gil_scoped_release release;
    for (int64_t a = 0; a < nq; ++a)
      for (int64_t b = 0; b < nx; ++b) {
        int d = 0;
        for (int64_t w = 0; w < words; ++w) d += __builtin_popcountll(q[a * words + w] ^ x[b * words + w]);
        o[a * nx + b] = d;
      }
  }
  return out;
}

}  // namespace
}  // namespace fasthash

PYBIND11_MODULE(_C, m) {
  using namespace fasthash;
  m.doc() = "fasthash compiled core: exact Hamming search over packed uint64 codes";
  m.def("hamming_distances", &hamming_distances, py::arg("queries"), py::arg("gallery"),
        "All-pairs Hamming distances of packed uint64 codes [Q, W] x [N, W] -> int32 [Q, N].");
  m.def("topk", &topk, py::arg("queries"), py::arg("gallery"), py::arg("k"),
        py::arg("mask") = py::none(), py::arg("num_threads") = 0, py::arg("simd") = "",
        "Exact top-k: (int32 distances [Q, k], int64 indices [Q, k]) ordered by (distance, "
        "index). mask: None, [W] or [Q, W] uint64. num_threads 0 = all cores. simd '' = the "
        "level in use.");
  m.def("radius", &radius, py::arg("queries"), py::arg("gallery"), py::arg("r"),
        py::arg("mask") = py::none(), py::arg("num_threads") = 0, py::arg("simd") = "",
        "Radius search: (int64 lims [Q+1], int32 distances, int64 indices), FAISS style.");
  m.def("simd_level", []() { return std::string(simd_name(resolve_simd(""))); },
        "SIMD level in use (FASTHASH_SIMD or set_simd_level override the CPUID choice).");
  m.def("set_simd_level",
        [](const std::string& name) {
          SimdState& st = simd_state();
          if (name.empty() || name == "auto") {
            st.level = best_simd();
          } else {
            st.level = resolve_simd(name);
          }
          st.error.clear();
        },
        py::arg("name"), "Force a SIMD level ('scalar', 'avx2', 'avx512', or 'auto').");
  m.def("available_simd_levels",
        []() {
          std::vector<std::string> out;
          for (Simd s : {Simd::Scalar, Simd::Avx2, Simd::Avx512})
            if (simd_supported(s)) out.emplace_back(simd_name(s));
          return out;
        },
        "SIMD levels this CPU supports, slowest first.");
  m.def("hardware_threads", &hardware_threads, "Threads used when num_threads is 0.");
}
