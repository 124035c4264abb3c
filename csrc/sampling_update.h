// Argument checks shared by the CPU and CUDA sampling-update ops, and the per-element update.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "layout.h"
#include "macros.h"

namespace ddpm_fast {

// The coefficient row coef = [c1, c2, a, b0, b1, b2, b3, sigma, r] (ddpm_fast.ops.reference):
//   x0  = c1 x - c2 model_out;   xc = x0 clamped to [-1, 1] if clip, else x0
//   out = a base + b0 xc + r (x0 - xc) + b1 h0 + b2 h1 + b3 h2 + sigma z
constexpr int kCoefs = 9;
constexpr int kMaxHistory = 3;

DDPM_HD float sampling_x0(float x, float m, const float* coef) { return coef[0] * x - coef[1] * m; }

DDPM_HD float sampling_clip(float x0, bool clip) { return clip ? fminf(fmaxf(x0, -1.0f), 1.0f) : x0; }

// out from the base value, x0 and its clipped xc, the first n_hist of h and the normal z, summed in
// the reference's order. The loop runs to the constant bound so that, unrolled, h stays in
// registers on the GPU.
DDPM_HD float sampling_out(float base, float x0, float xc, const float* h, int n_hist, float z, const float* coef) {
  float out = coef[2] * base + coef[3] * xc + coef[8] * (x0 - xc) + coef[7] * z;
  for (int k = 0; k < kMaxHistory; ++k) {
    if (k < n_hist) out += coef[4 + k] * h[k];
  }
  return out;
}

// Raw pointers of the optional inputs, for the kernels (passed by value to the CUDA one).
template <typename T>
struct SamplingExtras {
  const T* base = nullptr;  // nullptr: the base is x
  const T* history[kMaxHistory] = {};
  int n_hist = 0;
};

// The checked, laid-out inputs and the allocated outputs of one call, the same for the CPU and
// the CUDA kernel (the caller sets the CUDA device first, so the outputs land on it).
struct SamplingInputs {
  at::Tensor x, model_out, coef;    // x's memory format; coef float32 (9,)
  at::Tensor base;                  // x's dtype and layout, or undefined: the base is x
  std::vector<at::Tensor> history;  // at most kMaxHistory, x's dtype and layout
  at::Tensor noise;                 // float32, or undefined: draw Philox normals from `seed`
  at::Tensor seed;                  // int64, defined exactly when noise is not
  at::Tensor out, x0;               // x's dtype and memory format
  bool has_noise() const { return noise.defined(); }

  template <typename T>
  SamplingExtras<T> extras() const {
    SamplingExtras<T> e;
    if (base.defined()) e.base = base.const_data_ptr<T>();
    for (const at::Tensor& h : history) e.history[e.n_hist++] = h.const_data_ptr<T>();
    return e;
  }
};

// t shaped like x, floating point and on x's device.
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "sampling_update: ", name, " must be floating point");
  TORCH_CHECK(t.sizes() == x.sizes(), "sampling_update: ", name, " has shape ", t.sizes(), ", x has ", x.sizes());
  TORCH_CHECK(t.device() == x.device(), "sampling_update: ", name, " is on ", t.device(), ", x on ", x.device());
}

// Every input takes x's layout (a no-op in the usual case) so that one flat index serves all;
// base and history are read in x's dtype (they are this op's earlier outputs: a no-op then).
inline SamplingInputs sampling_inputs(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef,
                                      at::TensorList history, const std::optional<at::Tensor>& base,
                                      const std::optional<at::Tensor>& noise,
                                      const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "sampling_update: x must be floating point");
  check_like_x(model_out, x, "model_out");
  TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.numel() == kCoefs && coef.device() == x.device(),
              "sampling_update: coef must be a float32 (9,) tensor on x's device");
  TORCH_CHECK(history.size() <= kMaxHistory, "sampling_update: at most ", kMaxHistory, " history tensors, got ",
              history.size());
  const at::MemoryFormat fmt = memory_format_of(x);
  SamplingInputs in;
  in.x = x.contiguous(fmt);
  in.model_out = model_out.contiguous(fmt);
  in.coef = coef.contiguous();
  for (const at::Tensor& h : history) {
    check_like_x(h, x, "history");
    in.history.push_back(h.to(x.scalar_type()).contiguous(fmt));
  }
  if (base.has_value() && base->defined()) {
    check_like_x(*base, x, "base");
    in.base = base->to(x.scalar_type()).contiguous(fmt);
  }
  if (noise.has_value() && noise->defined()) {
    check_like_x(*noise, x, "noise");
    in.noise = noise->to(at::kFloat).contiguous(fmt);
  } else {
    TORCH_CHECK(seed.has_value() && seed->defined(), "sampling_update: pass noise or a seed");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() >= 1 && seed->device() == x.device(),
                "sampling_update: seed must be an int64 (1,) tensor on x's device");
    in.seed = seed->contiguous();
  }
  in.out = at::empty_like(in.x, in.x.options(), fmt);
  in.x0 = at::empty_like(in.x, in.x.options(), fmt);
  return in;
}

}  // namespace ddpm_fast
