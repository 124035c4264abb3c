// Argument checks shared by the CPU and CUDA sampling-update ops, and the per-element update.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>

#include "layout.h"
#include "macros.h"

namespace ddpm_fast {

// x0 = c1 x_t - c2 eps (clamped to [-1, 1] if clip); out = m1 x0 + m2 x_t + sigma z.
// coef = [c1, c2, m1, m2, sigma].
DDPM_HD float sampling_update_element(float x, float e, float z, const float* coef, bool clip) {
  float x0 = coef[0] * x - coef[1] * e;
  if (clip) x0 = fminf(fmaxf(x0, -1.0f), 1.0f);
  return coef[2] * x0 + coef[3] * x + coef[4] * z;
}

inline void check_sampling_args(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& coef,
                                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(at::isFloatingType(x_t.scalar_type()) && at::isFloatingType(eps.scalar_type()),
              "sampling_update: x_t and eps must be floating point");
  TORCH_CHECK(eps.sizes() == x_t.sizes(), "sampling_update: eps has shape ", eps.sizes(), ", x_t has ",
              x_t.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.numel() == 5 && coef.device() == x_t.device(),
              "sampling_update: coef must be a float32 (5,) tensor on x_t's device");
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) {
    TORCH_CHECK(noise->sizes() == x_t.sizes(), "sampling_update: noise has shape ", noise->sizes(),
                ", x_t has ", x_t.sizes());
  } else {
    TORCH_CHECK(seed.has_value() && seed->defined(), "sampling_update: pass noise or a seed");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() >= 1 && seed->device() == x_t.device(),
                "sampling_update: seed must be an int64 (1,) tensor on x_t's device");
  }
}

// The checked, laid-out inputs and the allocated output of one call, the same for the CPU and the
// CUDA kernel (the caller sets the CUDA device first, so the output lands on it).
struct SamplingInputs {
  at::Tensor x_t, eps, coef;  // x_t's memory format; coef float32 (5,)
  at::Tensor noise;           // float32, or undefined: draw Philox normals from `seed`
  at::Tensor seed;            // int64, defined exactly when noise is not
  at::Tensor out;             // x_t's dtype and memory format
  bool has_noise() const { return noise.defined(); }
};

inline SamplingInputs sampling_inputs(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& coef,
                                      const std::optional<at::Tensor>& noise,
                                      const std::optional<at::Tensor>& seed) {
  check_sampling_args(x_t, eps, coef, noise, seed);
  const at::MemoryFormat fmt = memory_format_of(x_t);
  SamplingInputs in;
  in.x_t = x_t.contiguous(fmt);
  in.eps = eps.contiguous(fmt);
  in.coef = coef.contiguous();
  if (noise.has_value() && noise->defined()) {
    in.noise = noise->to(at::kFloat).contiguous(fmt);
  } else {
    in.seed = seed->contiguous();
  }
  in.out = at::empty_like(in.x_t, in.x_t.options(), fmt);
  return in;
}

}  // namespace ddpm_fast
