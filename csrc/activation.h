// The activations fused into GroupNorm, shared by the CPU (.cpp) and CUDA (.cu) kernels so the
// two compute the same function. Each matches torch.nn.functional's definition, derivative
// included (hardswish's slope at the kinks follows aten's hardswish_backward).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "macros.h"

namespace ddpm_fast {

enum class Act : int { None = 0, Silu = 1, Hardswish = 2 };

// False for an unknown name (the ops turn that into a TORCH_CHECK message).
inline bool parse_act(std::string_view name, Act* out) {
  if (name == "none") { *out = Act::None; return true; }
  if (name == "silu") { *out = Act::Silu; return true; }
  if (name == "hardswish") { *out = Act::Hardswish; return true; }
  return false;
}

// e^x for the CPU kernels, free of calls and branches so that `omp simd` loops vectorise it
// (glibc's expf is a scalar call, and the SiLU derivative made the backward pass exp-bound).
// Cephes' expf: x = k ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (a couple of ulp).
inline float exp_vectorizable(float x) {
  // Keeps 2^k a normal float; NaN passes. +-40 rather than the float limits: compilers evaluate
  // the activations at the clamp bounds on a side path, and products with 1 / (1 + e^88) are
  // denormals whose every use costs a microcode assist (it made SiLU 10x slower). For SiLU the
  // clamp changes nothing in float: 1 + e^-40 rounds to 1, and |v| / (1 + e^40) < |v| * 5e-18.
  x = x < -40.0f ? -40.0f : (x > 40.0f ? 40.0f : x);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;             // x - k ln2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

DDPM_HD float act_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_vectorizable(x);
#endif
}

template <Act A>
DDPM_HD float act_forward(float v) {
  if constexpr (A == Act::Silu) {
    return v / (1.0f + act_exp(-v));
  } else if constexpr (A == Act::Hardswish) {
    const float r = v + 3.0f;  // relu6(v + 3) with selects, not fminf/fmaxf: those do not vectorise
    return v * (r < 0.0f ? 0.0f : (r > 6.0f ? 6.0f : r)) / 6.0f;
  } else {
    return v;
  }
}

// d act(v) / dv.
template <Act A>
DDPM_HD float act_grad(float v) {
  if constexpr (A == Act::Silu) {
    const float s = 1.0f / (1.0f + act_exp(-v));
    return s * (1.0f + v * (1.0f - s));
  } else if constexpr (A == Act::Hardswish) {
    return v < -3.0f ? 0.0f : (v <= 3.0f ? v / 3.0f + 0.5f : 1.0f);
  } else {
    return 1.0f;
  }
}

}  // namespace ddpm_fast
