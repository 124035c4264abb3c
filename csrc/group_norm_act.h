// Shape checks and parameter preparation shared by the CPU and CUDA GroupNorm+activation ops.
// Header-only and free of torch/extension.h so the .cu file compiles quickly.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

#include "activation.h"
#include "layout.h"

// The dtypes x may have (float32 statistics whatever they are).
#define DDPM_DISPATCH_NORM_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace ddpm_fast {

struct GroupNormProblem {
  int64_t batch, channels, hw, groups, group_channels;
  bool channels_last;
  Act act;
  int64_t group_numel() const { return group_channels * hw; }
};

inline GroupNormProblem gn_problem(const at::Tensor& x, int64_t num_groups, std::string_view act) {
  TORCH_CHECK(x.dim() == 4, "group_norm_act: x must be (B, C, H, W), got ", x.dim(), " dims");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "group_norm_act: x must be float32, bfloat16 or float16, got ", dt);
  GroupNormProblem p{};
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.hw = x.size(2) * x.size(3);
  p.groups = num_groups;
  TORCH_CHECK(num_groups > 0 && p.channels % num_groups == 0, "group_norm_act: ", p.channels,
              " channels do not split into ", num_groups, " groups");
  p.group_channels = p.channels / num_groups;
  p.channels_last = memory_format_of(x) == at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(parse_act(act, &p.act), "group_norm_act: act must be none, silu or hardswish, got '",
              std::string(act), "'");
  return p;
}

// A float32 contiguous copy of an optional per-channel parameter (weight, bias) or per-(B, C)
// add, checked for shape; undefined when absent.
inline at::Tensor gn_float_param(const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* name,
                                 const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == shape, "group_norm_act: ", name, " must have shape ", shape, ", got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), "group_norm_act: ", name, " is on ", t->device(), ", x on ", x.device());
  return t->to(at::kFloat).contiguous();
}

// The checked, laid-out inputs and the allocated outputs of one backward call: the same for the
// CPU and the CUDA kernel (the caller sets the CUDA device first, so outputs land on it).
struct GroupNormBackward {
  GroupNormProblem p;
  at::Tensor x, dy, mean, rstd;  // x's dtype and memory format; statistics float32
  at::Tensor weight, bias, add;  // float32, undefined when absent
  at::Tensor dx;                 // x's dtype and memory format
  at::Tensor db, dsx, dadd;      // float32 (B, C) per-sample partial sums, reduced over B by the caller
};

inline GroupNormBackward gn_backward(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean,
                                     const at::Tensor& rstd, int64_t num_groups,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& add, std::string_view act) {
  GroupNormBackward b;
  b.p = gn_problem(x_in, num_groups, act);
  const at::MemoryFormat fmt = memory_format_of(x_in);
  b.x = x_in.contiguous(fmt);
  TORCH_CHECK(grad_y.sizes() == b.x.sizes(), "group_norm_act_backward: grad_y has shape ", grad_y.sizes(),
              ", x has ", b.x.sizes());
  b.dy = grad_y.to(b.x.scalar_type()).contiguous(fmt);
  b.mean = mean.to(at::kFloat).contiguous();
  b.rstd = rstd.to(at::kFloat).contiguous();
  TORCH_CHECK(b.mean.numel() == b.p.batch * b.p.groups && b.rstd.numel() == b.p.batch * b.p.groups,
              "group_norm_act_backward: mean and rstd must hold B * G values");
  b.weight = gn_float_param(weight, {b.p.channels}, "weight", b.x);
  b.bias = gn_float_param(bias, {b.p.channels}, "bias", b.x);
  b.add = gn_float_param(add, {b.p.batch, b.p.channels}, "add", b.x);
  b.dx = at::empty_like(b.x, b.x.options(), fmt);
  const auto f32 = b.x.options().dtype(at::kFloat);
  b.db = at::empty({b.p.batch, b.p.channels}, f32);
  b.dsx = at::empty({b.p.batch, b.p.channels}, f32);
  b.dadd = at::empty({b.p.batch, b.p.channels}, f32);
  return b;
}

}  // namespace ddpm_fast
