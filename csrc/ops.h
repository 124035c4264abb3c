// The CPU kernels of the ddpm_fast ops, callable directly (the C++ tests do). Schemas live in
// ops.cpp; each op's .cpp registers its CPU kernel and its .cu its CUDA kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace ddpm_fast {

// y = act(group_norm(x + add[:, :, None, None]) * weight + bias); returns (y, mean, rstd) with
// (B, G) float32 statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_forward_cpu(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add, std::string_view act);

// (grad_x, grad_weight, grad_bias, grad_add): grad_x in x's dtype and layout, the rest float32,
// (C,), (C,) and (B, C).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& add, std::string_view act);

// The sampling update of every solver, coef = [c1, c2, a, b0, b1, b2, b3, sigma] (float32):
//   x0 = c1 * x - c2 * model_out (clamped to [-1, 1] if clip_x0)
//   out = a * base + b0 * x0 + b1 * history[0] + b2 * history[1] + b3 * history[2] + sigma * z
// base defaults to x, history holds at most three tensors, z = noise, or Philox normals from
// seed[0] when noise is absent. Returns (out, x0) in x's dtype and memory format.
std::tuple<at::Tensor, at::Tensor> sampling_update_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                                       const at::Tensor& coef, bool clip_x0, at::TensorList history,
                                                       const std::optional<at::Tensor>& base,
                                                       const std::optional<at::Tensor>& noise,
                                                       const std::optional<at::Tensor>& seed);

// Dropout with a Philox mask of (seed[0], memory position), as aten::native_dropout: (x / (1 - p)
// where kept, else 0; the bool mask), both in x's memory format (dropout.cpp).
std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed);

}  // namespace ddpm_fast
