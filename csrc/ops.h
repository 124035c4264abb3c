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

// out = m1 * x0 + m2 * x_t + sigma * z with x0 = c1 * x_t - c2 * eps (clamped if clip_x0) and
// coef = [c1, c2, m1, m2, sigma]; z = noise, or Philox normals from seed[0] when noise is absent.
at::Tensor sampling_update_cpu(const at::Tensor& x_t, const at::Tensor& eps, const at::Tensor& coef, bool clip_x0,
                               const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed);

}  // namespace ddpm_fast
