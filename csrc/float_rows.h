// Float values loaded from and stored to a kernel's dtype in forms that loops vectorise (the CPU
// kernels): c10::BFloat16's own conversions go through its struct, which a vector loop cannot take.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace ddpm_fast {

// c10::BFloat16's rounding (to nearest even, NaN to 0x7FC0) with a select for its NaN branch, so
// that a loop of it vectorises.
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  return v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// v as float: a bf16 is the high half of its float.
template <typename T>
inline float load_float(const T& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return static_cast<float>(v);
  }
}

// Writes row[0, n) to out[0, n) in out's dtype. A loop of its own: the rounding to bf16/fp16 kept
// the producing loop (activation) from vectorising.
template <typename T>
inline void store_row(const float* row, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(out, row, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i].x = bf16_bits(row[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(row[i]);
  }
}

}  // namespace ddpm_fast
