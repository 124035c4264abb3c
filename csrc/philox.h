// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// Box-Muller transform, host+device, so the CPU and CUDA sampling kernels draw the same noise
// for the same (seed, element index): element i takes normal i % 4 of the block with counter
// i / 4 under the key (seed). No state, so every element is independent of launch geometry.
#pragma once

#include <cmath>
#include <cstdint>

#include "macros.h"

namespace ddpm_fast {

struct Philox4 {
  uint32_t v[4];
};

DDPM_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on the counter `c` under the key (k0, k1).
DDPM_HD Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(0xD2511F53u, c.v[0], &hi0);
    const uint32_t lo1 = mulhilo(0xCD9E8D57u, c.v[2], &hi1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;  // the Weyl key schedule
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Two standard normals from two uniform words. u1 lies in (0, 1] so the log is finite.
DDPM_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  constexpr float kInv2Pow32 = 2.3283064365386963e-10f;  // 2^-32
  const float u1 = (static_cast<float>(a) + 1.0f) * kInv2Pow32;
  const float u2 = static_cast<float>(b) * kInv2Pow32;
  const float r = sqrtf(-2.0f * logf(fminf(u1, 1.0f)));
#if defined(__CUDA_ARCH__)
  // sincospi needs no range reduction through local memory, unlike sincosf of 2 pi u2.
  float s, c;
  sincospif(2.0f * u2, &s, &c);
#else
  constexpr double kTwoPi = 6.283185307179586;
  const float s = static_cast<float>(std::sin(kTwoPi * static_cast<double>(u2)));
  const float c = static_cast<float>(std::cos(kTwoPi * static_cast<double>(u2)));
#endif
  *z0 = r * c;
  *z1 = r * s;
}

// The four standard normals of elements 4 * block .. 4 * block + 3 under `seed`: the counter is
// (block, 0) and the key is the seed, as 32-bit words, low first.
DDPM_HD void philox_normal4(uint64_t seed, uint64_t block, float z[4]) {
  const Philox4 counter{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u}};
  const Philox4 r = philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(r.v[0], r.v[1], &z[0], &z[1]);
  box_muller(r.v[2], r.v[3], &z[2], &z[3]);
}

}  // namespace ddpm_fast
