// GroupNorm + activation, CPU kernels. One task per (batch, group) under at::parallel_for; each
// task reads its group a few times while it sits in cache: mean, then the centred variance
// (two passes: exact even when |mean| >> std), then the output. Statistics in float32 per
// channel, summed across channels in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "group_norm_act.h"
#include "ops.h"

namespace ddpm_fast {
namespace {

// Where the group's elements live: NCHW holds each channel's H*W values contiguously; channels_last
// holds, for each pixel, the group's channels contiguously with rows C apart.
struct GroupView {
  int64_t base, channel0;
};

inline GroupView group_view(const GroupNormProblem& p, int64_t b, int64_t g) {
  const int64_t c0 = g * p.group_channels;
  return {p.channels_last ? b * p.hw * p.channels + c0 : (b * p.channels + c0) * p.hw, c0};
}

inline double sum_of(const float* acc, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += acc[i];
  return s;
}

// Per-channel sums of f(x + a) over the group into acc[cl], a = the channel's add term.
template <bool CL, typename T, typename F>
inline void channel_sums(const GroupNormProblem& p, const GroupView& v, const T* x, const float* a, float* acc, F f) {
  const int64_t cg = p.group_channels, hw = p.hw;
  if constexpr (CL) {
    for (int64_t cl = 0; cl < cg; ++cl) acc[cl] = 0.0f;
    for (int64_t s = 0; s < hw; ++s) {
      const T* xr = x + v.base + s * p.channels;
      for (int64_t cl = 0; cl < cg; ++cl) acc[cl] += f(static_cast<float>(xr[cl]) + a[cl]);
    }
  } else {
    for (int64_t cl = 0; cl < cg; ++cl) {
      const T* xr = x + v.base + cl * hw;
      const float ac = a[cl];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t s = 0; s < hw; ++s) sum += f(static_cast<float>(xr[s]) + ac);
      acc[cl] = sum;
    }
  }
}

template <typename T, Act A, bool CL>
void forward_kernel(const GroupNormProblem& p, const T* x, const float* add, const float* weight, const float* bias,
                    double eps, T* y, float* mean_out, float* rstd_out) {
  const int64_t cg = p.group_channels, hw = p.hw;
  at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(cg), acc(cg), shift(cg), scale(cg), out_row(CL ? 0 : hw);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.groups;
      const GroupView v = group_view(p, b, bg % p.groups);
      for (int64_t cl = 0; cl < cg; ++cl) a[cl] = add ? add[b * p.channels + v.channel0 + cl] : 0.0f;
      const double n = static_cast<double>(p.group_numel());

      channel_sums<CL>(p, v, x, a.data(), acc.data(), [](float h) { return h; });
      const float mean = static_cast<float>(sum_of(acc.data(), cg) / n);
      channel_sums<CL>(p, v, x, a.data(), acc.data(), [mean](float h) { return (h - mean) * (h - mean); });
      const float rstd = static_cast<float>(1.0 / std::sqrt(sum_of(acc.data(), cg) / n + eps));
      mean_out[bg] = mean;
      rstd_out[bg] = rstd;

      // act(((x + a) - mean) * rstd * w + b) as one multiply-add per element.
      for (int64_t cl = 0; cl < cg; ++cl) {
        const int64_t c = v.channel0 + cl;
        scale[cl] = rstd * (weight ? weight[c] : 1.0f);
        shift[cl] = (bias ? bias[c] : 0.0f) + (a[cl] - mean) * scale[cl];
      }
      if constexpr (CL) {
        for (int64_t s = 0; s < hw; ++s) {
          const T* xr = x + v.base + s * p.channels;
          T* yr = y + v.base + s * p.channels;
          for (int64_t cl = 0; cl < cg; ++cl) {
            yr[cl] = static_cast<T>(act_forward<A>(static_cast<float>(xr[cl]) * scale[cl] + shift[cl]));
          }
        }
      } else {
        for (int64_t cl = 0; cl < cg; ++cl) {
          const T* xr = x + v.base + cl * hw;
          T* yr = y + v.base + cl * hw;
          const float sc = scale[cl], sh = shift[cl];
          if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
            for (int64_t s = 0; s < hw; ++s) yr[s] = act_forward<A>(xr[s] * sc + sh);
          } else {
            // Activation into a float row first: the rounding to bf16/fp16 has branches that
            // would keep the activation's loop from vectorising.
            float* row = out_row.data();
#pragma omp simd
            for (int64_t s = 0; s < hw; ++s) row[s] = act_forward<A>(static_cast<float>(xr[s]) * sc + sh);
            for (int64_t s = 0; s < hw; ++s) yr[s] = static_cast<T>(row[s]);
          }
        }
      }
    }
  });
}

// With xhat = (x + a - mean) * rstd, yp = xhat * w + b and g = dy * act'(yp):
//   grad_x = rstd * (g * w - mean(g * w) - xhat * mean(g * w * xhat))   (means over the group)
//   grad_w = sum_{b, hw} g * xhat,  grad_b = sum_{b, hw} g,  grad_add[b, c] = sum_hw grad_x.
// Pass 1 takes the per-(b, c) sums of g, g * xhat and xhat and keeps g (one activation
// derivative per element) in a group-sized buffer that pass 2 reads back; the batch sums for
// grad_w and grad_b happen afterwards.
template <typename T, Act A, bool CL>
void backward_kernel(const GroupNormProblem& p, const T* dy, const T* x, const float* mean_in, const float* rstd_in,
                     const float* add, const float* weight, const float* bias, T* dx, float* db, float* dsx,
                     float* dadd) {
  const int64_t cg = p.group_channels, hw = p.hw;
  at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(cg), w(cg), bs(cg), sum_xhat(cg), g_buf(p.group_numel());
    float* gb = g_buf.data();
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.groups;
      const GroupView v = group_view(p, b, bg % p.groups);
      const float mean = mean_in[bg], rstd = rstd_in[bg];
      for (int64_t cl = 0; cl < cg; ++cl) {
        const int64_t c = v.channel0 + cl;
        a[cl] = add ? add[b * p.channels + c] : 0.0f;
        w[cl] = weight ? weight[c] : 1.0f;
        bs[cl] = bias ? bias[c] : 0.0f;
      }
      float* db_bc = db + b * p.channels + v.channel0;
      float* dsx_bc = dsx + b * p.channels + v.channel0;
      // g_buf[j] is element j of the group in memory order.
      if constexpr (CL) {
        for (int64_t cl = 0; cl < cg; ++cl) db_bc[cl] = dsx_bc[cl] = sum_xhat[cl] = 0.0f;
        for (int64_t s = 0; s < hw; ++s) {
          const T* xr = x + v.base + s * p.channels;
          const T* dyr = dy + v.base + s * p.channels;
          for (int64_t cl = 0; cl < cg; ++cl) {
            const float xh = (static_cast<float>(xr[cl]) + a[cl] - mean) * rstd;
            const float g = static_cast<float>(dyr[cl]) * act_grad<A>(xh * w[cl] + bs[cl]);
            gb[s * cg + cl] = g;
            db_bc[cl] += g;
            dsx_bc[cl] += g * xh;
            sum_xhat[cl] += xh;
          }
        }
      } else {
        for (int64_t cl = 0; cl < cg; ++cl) {
          const T* xr = x + v.base + cl * hw;
          const T* dyr = dy + v.base + cl * hw;
          float* gr = gb + cl * hw;
          const float ac = a[cl], wc = w[cl], bc = bs[cl];
          float s_g = 0.0f, s_gx = 0.0f, s_x = 0.0f;
#pragma omp simd reduction(+ : s_g, s_gx, s_x)
          for (int64_t s = 0; s < hw; ++s) {
            const float xh = (static_cast<float>(xr[s]) + ac - mean) * rstd;
            const float g = static_cast<float>(dyr[s]) * act_grad<A>(xh * wc + bc);
            gr[s] = g;
            s_g += g;
            s_gx += g * xh;
            s_x += xh;
          }
          db_bc[cl] = s_g;
          dsx_bc[cl] = s_gx;
          sum_xhat[cl] = s_x;
        }
      }

      double m1 = 0.0, m2 = 0.0;
      for (int64_t cl = 0; cl < cg; ++cl) {
        m1 += static_cast<double>(w[cl]) * db_bc[cl];
        m2 += static_cast<double>(w[cl]) * dsx_bc[cl];
      }
      const float mean_g = static_cast<float>(m1 / p.group_numel());
      const float mean_gx = static_cast<float>(m2 / p.group_numel());
      // Pass 2: grad_x = rstd * g * w - rstd * xhat * mean_gx - rstd * mean_g, xhat recomputed.
      if constexpr (CL) {
        for (int64_t s = 0; s < hw; ++s) {
          const T* xr = x + v.base + s * p.channels;
          T* dxr = dx + v.base + s * p.channels;
          for (int64_t cl = 0; cl < cg; ++cl) {
            const float xh = (static_cast<float>(xr[cl]) + a[cl] - mean) * rstd;
            dxr[cl] = static_cast<T>(rstd * (gb[s * cg + cl] * w[cl] - mean_g - xh * mean_gx));
          }
        }
      } else {
        for (int64_t cl = 0; cl < cg; ++cl) {
          const T* xr = x + v.base + cl * hw;
          T* dxr = dx + v.base + cl * hw;
          const float* gr = gb + cl * hw;
          const float ac = a[cl], wc = w[cl];
#pragma omp simd
          for (int64_t s = 0; s < hw; ++s) {
            const float xh = (static_cast<float>(xr[s]) + ac - mean) * rstd;
            dxr[s] = static_cast<T>(rstd * (gr[s] * wc - mean_g - xh * mean_gx));
          }
        }
      }
      // sum_hw grad_x in closed form, from the sums above.
      for (int64_t cl = 0; cl < cg; ++cl) {
        dadd[b * p.channels + v.channel0 + cl] = rstd * (w[cl] * db_bc[cl] - hw * mean_g - mean_gx * sum_xhat[cl]);
      }
    }
  });
}

// Calls f(Act-constant, bool-constant) for the runtime activation and layout.
template <typename F>
void dispatch_act_layout(const GroupNormProblem& p, F f) {
  auto with_layout = [&](auto act) {
    if (p.channels_last) {
      f(act, std::true_type{});
    } else {
      f(act, std::false_type{});
    }
  };
  switch (p.act) {
    case Act::Silu: with_layout(std::integral_constant<Act, Act::Silu>{}); break;
    case Act::Hardswish: with_layout(std::integral_constant<Act, Act::Hardswish>{}); break;
    case Act::None: with_layout(std::integral_constant<Act, Act::None>{}); break;
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_forward_cpu(
    const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps, const std::optional<at::Tensor>& add_in,
    std::string_view act) {
  const GroupNormProblem p = gn_problem(x_in, num_groups, act);
  const at::Tensor x = x_in.contiguous(memory_format_of(x_in));
  const at::Tensor weight = gn_float_param(weight_in, {p.channels}, "weight", x);
  const at::Tensor bias = gn_float_param(bias_in, {p.channels}, "bias", x);
  const at::Tensor add = gn_float_param(add_in, {p.batch, p.channels}, "add", x);
  at::Tensor y = at::empty_like(x, x.options(), memory_format_of(x_in));
  at::Tensor mean = at::empty({p.batch, p.groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({p.batch, p.groups}, x.options().dtype(at::kFloat));
  DDPM_DISPATCH_NORM_TYPES(x.scalar_type(), "group_norm_act_forward_cpu", [&] {
    dispatch_act_layout(p, [&](auto a, auto cl) {
      forward_kernel<scalar_t, decltype(a)::value, decltype(cl)::value>(
          p, x.const_data_ptr<scalar_t>(), ptr_or_null<float>(add), ptr_or_null<float>(weight),
          ptr_or_null<float>(bias), eps, y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
          rstd.mutable_data_ptr<float>());
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& add_in, std::string_view act) {
  GroupNormBackward b = gn_backward(grad_y, x_in, mean, rstd, num_groups, weight_in, bias_in, add_in, act);
  const GroupNormProblem& p = b.p;
  const at::Tensor &x = b.x, &dy = b.dy, &mean_c = b.mean, &rstd_c = b.rstd;
  const at::Tensor &weight = b.weight, &bias = b.bias, &add = b.add;
  at::Tensor &dx = b.dx, &db = b.db, &dsx = b.dsx, &dadd = b.dadd;
  DDPM_DISPATCH_NORM_TYPES(x.scalar_type(), "group_norm_act_backward_cpu", [&] {
    dispatch_act_layout(p, [&](auto a, auto cl) {
      backward_kernel<scalar_t, decltype(a)::value, decltype(cl)::value>(
          p, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<float>(),
          rstd_c.const_data_ptr<float>(), ptr_or_null<float>(add), ptr_or_null<float>(weight),
          ptr_or_null<float>(bias), dx.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<float>(),
          dsx.mutable_data_ptr<float>(), dadd.mutable_data_ptr<float>());
    });
  });
  return {dx, dsx.sum(0), db.sum(0), dadd};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_act_forward", &group_norm_act_forward_cpu);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cpu);
}

}  // namespace ddpm_fast
