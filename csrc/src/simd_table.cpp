// Lookups over the SIMD level table (simd_table.h); no level is named anywhere else.
#include "fasthash/simd_table.h"

#include "fasthash/search.h"

namespace fasthash {

const SimdLevel& simd_row(Simd s) {
  for (const SimdLevel& row : kSimdLevels)
    if (row.level == s) return row;
  return kSimdLevels[0];
}

std::string simd_names() {
  std::string out;
  for (const SimdLevel& row : kSimdLevels) {
    if (!out.empty()) out += ", ";
    out += row.name;
  }
  return out;
}

bool simd_supported(Simd s) { return simd_row(s).level == s && simd_row(s).supported(); }

Simd best_simd() {
  Simd best = kSimdLevels[0].level;
  for (const SimdLevel& row : kSimdLevels)
    if (row.supported()) best = row.level;
  return best;
}

const char* simd_name(Simd s) { return simd_row(s).name; }

bool parse_simd(const std::string& name, Simd* out) {
  for (const SimdLevel& row : kSimdLevels) {
    if (name == row.name) {
      *out = row.level;
      return true;
    }
  }
  return false;
}

}  // namespace fasthash
