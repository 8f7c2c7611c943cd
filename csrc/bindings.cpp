// pybind11 bindings of fasthash._C: numpy buffers in and out, checks with clear messages,
// the GIL released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace fasthash {
void hamming_all_pairs(const uint64_t* q, int64_t nq, const uint64_t* x, int64_t nx, int64_t words,
                       int32_t* out);
}

namespace {

using U64Array = py::array;

py::buffer_info check_words(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<uint64_t>>(a) || a.dtype().kind() != 'u' || a.itemsize() != 8)
    throw py::type_error(std::string(name) + " must be a uint64 array of packed words, got dtype " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != 2)
    throw py::value_error(std::string(name) + " must be 2-D [rows, words], got ndim " +
                          std::to_string(a.ndim()));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous (use np.ascontiguousarray)");
  return a.request();
}

py::array_t<int32_t> hamming_distances(const U64Array& queries, const U64Array& gallery) {
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
    fasthash::hamming_all_pairs(q, nq, x, nx, words, o);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fasthash compiled core: packed Hamming distances and search";
  m.def("hamming_distances", &hamming_distances, py::arg("queries"), py::arg("gallery"),
        "All-pairs Hamming distances of packed uint64 codes [Q, W] x [N, W] -> int32 [Q, N].");
  m.def("simd_level", []() { return std::string("scalar"); }, "SIMD level in use.");
}
