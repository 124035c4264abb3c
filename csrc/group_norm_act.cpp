// GroupNorm + activation, CPU kernels, one pair per memory layout.
//
// NCHW holds each channel's H*W values contiguously: one task per (batch, group) under
// at::parallel_for reads its group a few times while it sits in cache: mean, then the centred
// variance (two passes: exact even when |mean| >> std), then the output.
// Channels_last holds each pixel's C channels contiguously: one task per batch item makes the same
// passes over its (H*W, C) slab, each a loop over pixels whose inner loop runs over all C channels
// at once, so it vectorises whatever the group size (a per-group walk would stride by C with
// 1-4 channels per step). Per-channel partial sums are then reduced per group.
// Statistics in float32 per channel, summed across channels in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "float_rows.h"
#include "group_norm_act.h"
#include "ops.h"

namespace ddpm_fast {
namespace {

// Where a group's elements live in NCHW: its channels' H*W rows, one after another.
inline int64_t nchw_group_base(const GroupNormProblem& p, int64_t b, int64_t g) {
  return (b * p.channels + g * p.group_channels) * p.hw;
}

inline double sum_of(const float* acc, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += acc[i];
  return s;
}

// Per-channel sums of f(x + a) over one NCHW group into acc[cl], a = the channel's add term.
template <typename T, typename F>
inline void nchw_channel_sums(const GroupNormProblem& p, const T* xg, const float* a, float* acc, F f) {
  const int64_t hw = p.hw;
  for (int64_t cl = 0; cl < p.group_channels; ++cl) {
    const T* xr = xg + cl * hw;
    const float ac = a[cl];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = 0; s < hw; ++s) sum += f(static_cast<float>(xr[s]) + ac);
    acc[cl] = sum;
  }
}

template <typename T, Act A>
void forward_nchw(const GroupNormProblem& p, const T* x, const float* add, const float* weight, const float* bias,
                  double eps, T* y, float* mean_out, float* rstd_out) {
  const int64_t cg = p.group_channels, hw = p.hw;
  at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(cg), acc(cg), row(hw);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.groups, c0 = (bg % p.groups) * cg;
      const int64_t base = nchw_group_base(p, b, bg % p.groups);
      for (int64_t cl = 0; cl < cg; ++cl) a[cl] = add ? add[b * p.channels + c0 + cl] : 0.0f;
      const double n = static_cast<double>(p.group_numel());

      nchw_channel_sums(p, x + base, a.data(), acc.data(), [](float h) { return h; });
      const float mean = static_cast<float>(sum_of(acc.data(), cg) / n);
      nchw_channel_sums(p, x + base, a.data(), acc.data(), [mean](float h) { return (h - mean) * (h - mean); });
      const float rstd = static_cast<float>(1.0 / std::sqrt(sum_of(acc.data(), cg) / n + eps));
      mean_out[bg] = mean;
      rstd_out[bg] = rstd;

      // act(((x + a) - mean) * rstd * w + b) as one multiply-add per element.
      for (int64_t cl = 0; cl < cg; ++cl) {
        const int64_t c = c0 + cl;
        const float sc = rstd * (weight ? weight[c] : 1.0f);
        const float sh = (bias ? bias[c] : 0.0f) + (a[cl] - mean) * sc;
        const T* xr = x + base + cl * hw;
        float* r = row.data();
#pragma omp simd
        for (int64_t s = 0; s < hw; ++s) r[s] = act_forward<A>(static_cast<float>(xr[s]) * sc + sh);
        store_row(r, y + base + cl * hw, hw);
      }
    }
  });
}

// Channel c's group statistic, from the per-(batch, group) row `stat` of one batch item.
inline void per_channel(const GroupNormProblem& p, const float* stat, float* out) {
  for (int64_t c = 0; c < p.channels; ++c) out[c] = stat[c / p.group_channels];
}

// One batch item's per-group mean of acc (per-channel sums over its H*W pixels) into stat[g].
inline void group_means(const GroupNormProblem& p, const float* acc, double* stat) {
  for (int64_t g = 0; g < p.groups; ++g) {
    stat[g] = sum_of(acc + g * p.group_channels, p.group_channels) / static_cast<double>(p.group_numel());
  }
}

// The channels_last loops run over a chunk of k pixel rows at once, k * C >= kSpan floats, with
// the per-channel vectors tiled k times: at C = 32 or 64 a loop over one row was a few vector
// iterations long and its set-up (and aliasing checks) cost as much as the work.
constexpr int64_t kSpan = 256;

inline int64_t rows_per_chunk(int64_t C) { return std::max<int64_t>(1, kSpan / C); }

// out[r * C + c] = v[c] for r < k.
inline void tile(const float* v, int64_t C, int64_t k, float* out) {
  for (int64_t r = 0; r < k; ++r) std::copy(v, v + C, out + r * C);
}

// out[c] = sum over r < k of acc[r * C + c].
inline void fold(const float* acc, int64_t C, int64_t k, float* out) {
  std::copy(acc, acc + C, out);
  for (int64_t r = 1; r < k; ++r) {
    for (int64_t c = 0; c < C; ++c) out[c] += acc[r * C + c];
  }
}

template <typename T, Act A>
void forward_cl(const GroupNormProblem& p, const T* x, const float* add, const float* weight, const float* bias,
                double eps, T* y, float* mean_out, float* rstd_out) {
  const int64_t C = p.channels, hw = p.hw, k = rows_per_chunk(C), L = k * C, n = hw * C;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(C), acc(C), m(C), scale(C), shift(C), tiled(L), part(L), row(L);
    std::vector<double> stat(p.groups);
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = x + b * n;
      for (int64_t c = 0; c < C; ++c) a[c] = add ? add[b * C + c] : 0.0f;
      float *ac = acc.data(), *mc = m.data(), *av = a.data(), *tv = tiled.data(), *pv = part.data();

      // Pass 1: per-channel sums of x, k rows at a time; the add term joins as hw * a.
      std::fill(part.begin(), part.end(), 0.0f);
      for (int64_t j0 = 0; j0 < n; j0 += L) {
        const T* xr = xb + j0;
        const int64_t len = std::min(L, n - j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) pv[j] += static_cast<float>(xr[j]);
      }
      fold(pv, C, k, ac);
      for (int64_t c = 0; c < C; ++c) ac[c] += static_cast<float>(hw) * av[c];
      group_means(p, ac, stat.data());
      for (int64_t g = 0; g < p.groups; ++g) mean_out[b * p.groups + g] = static_cast<float>(stat[g]);
      per_channel(p, mean_out + b * p.groups, mc);

      // Pass 2: per-channel sums of (x + a - mean)^2.
      for (int64_t c = 0; c < C; ++c) ac[c] = av[c] - mc[c];
      tile(ac, C, k, tv);
      std::fill(part.begin(), part.end(), 0.0f);
      for (int64_t j0 = 0; j0 < n; j0 += L) {
        const T* xr = xb + j0;
        const int64_t len = std::min(L, n - j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float d = static_cast<float>(xr[j]) + tv[j];
          pv[j] += d * d;
        }
      }
      fold(pv, C, k, ac);
      group_means(p, ac, stat.data());
      for (int64_t g = 0; g < p.groups; ++g) {
        rstd_out[b * p.groups + g] = static_cast<float>(1.0 / std::sqrt(stat[g] + eps));
      }
      per_channel(p, rstd_out + b * p.groups, scale.data());
      for (int64_t c = 0; c < C; ++c) {
        scale[c] *= weight ? weight[c] : 1.0f;
        shift[c] = (bias ? bias[c] : 0.0f) + (av[c] - mc[c]) * scale[c];
      }

      // Pass 3: act(x * scale + shift), k pixel rows at a time.
      tile(scale.data(), C, k, tv);
      tile(shift.data(), C, k, pv);
      float* r = row.data();
      for (int64_t j0 = 0; j0 < n; j0 += L) {
        const T* xr = xb + j0;
        const int64_t len = std::min(L, n - j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) r[j] = act_forward<A>(static_cast<float>(xr[j]) * tv[j] + pv[j]);
        store_row(r, y + b * n + j0, len);
      }
    }
  });
}

// With xhat = (x + a - mean) * rstd, yp = xhat * w + b and g = dy * act'(yp):
//   grad_x = rstd * (g * w - mean(g * w) - xhat * mean(g * w * xhat))   (means over the group)
//   grad_w = sum_{b, hw} g * xhat,  grad_b = sum_{b, hw} g,  grad_add[b, c] = sum_hw grad_x.
// Pass 1 takes the per-(b, c) sums of g, g * xhat and xhat and keeps g (one activation
// derivative per element) in a buffer that pass 2 reads back; the batch sums for grad_w and
// grad_b happen afterwards.
template <typename T, Act A>
void backward_nchw(const GroupNormProblem& p, const T* dy, const T* x, const float* mean_in, const float* rstd_in,
                   const float* add, const float* weight, const float* bias, T* dx, float* db, float* dsx,
                   float* dadd) {
  const int64_t cg = p.group_channels, hw = p.hw;
  at::parallel_for(0, p.batch * p.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(cg), sum_xhat(cg), g_buf(p.group_numel()), row(hw);
    float* gb = g_buf.data();
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.groups, c0 = (bg % p.groups) * cg;
      const int64_t base = nchw_group_base(p, b, bg % p.groups);
      const float mean = mean_in[bg], rstd = rstd_in[bg];
      float* db_bc = db + b * p.channels + c0;
      float* dsx_bc = dsx + b * p.channels + c0;
      for (int64_t cl = 0; cl < cg; ++cl) {
        const int64_t c = c0 + cl;
        const float ac = add ? add[b * p.channels + c] : 0.0f, bc = bias ? bias[c] : 0.0f;
        const float wc = w[cl] = weight ? weight[c] : 1.0f;
        const T* xr = x + base + cl * hw;
        const T* dyr = dy + base + cl * hw;
        float* gr = gb + cl * hw;
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

      double m1 = 0.0, m2 = 0.0;
      for (int64_t cl = 0; cl < cg; ++cl) {
        m1 += static_cast<double>(w[cl]) * db_bc[cl];
        m2 += static_cast<double>(w[cl]) * dsx_bc[cl];
      }
      const float mean_g = static_cast<float>(m1 / p.group_numel());
      const float mean_gx = static_cast<float>(m2 / p.group_numel());
      // Pass 2: grad_x = rstd * g * w - rstd * xhat * mean_gx - rstd * mean_g, xhat recomputed.
      for (int64_t cl = 0; cl < cg; ++cl) {
        const int64_t c = c0 + cl;
        const float ac = add ? add[b * p.channels + c] : 0.0f, wc = w[cl];
        const T* xr = x + base + cl * hw;
        const float* gr = gb + cl * hw;
        float* r = row.data();
#pragma omp simd
        for (int64_t s = 0; s < hw; ++s) {
          const float xh = (static_cast<float>(xr[s]) + ac - mean) * rstd;
          r[s] = rstd * (gr[s] * wc - mean_g - xh * mean_gx);
        }
        store_row(r, dx + base + cl * hw, hw);
        // sum_hw grad_x in closed form, from the sums above.
        dadd[b * p.channels + c] = rstd * (wc * db_bc[cl] - hw * mean_g - mean_gx * sum_xhat[cl]);
      }
    }
  });
}

// The same as backward_nchw, per batch item over its (H*W, C) slab, k pixel rows at a time as
// forward_cl; the group means of g * w and g * w * xhat are taken from the per-channel sums and
// spread back to the channels.
template <typename T, Act A>
void backward_cl(const GroupNormProblem& p, const T* dy, const T* x, const float* mean_in, const float* rstd_in,
                 const float* add, const float* weight, const float* bias, T* dx, float* db, float* dsx,
                 float* dadd) {
  const int64_t C = p.channels, hw = p.hw, cg = p.group_channels, k = rows_per_chunk(C), L = k * C, n = hw * C;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(C), w(C), bs(C), m(C), rs(C), sx(C), mg(C), mgx(C), am(L), rt(L), wt(L), bt(L), mgt(L),
        mgxt(L), s_g(L), s_gx(L), s_x(L), row(L), g_buf(n);
    float *av = a.data(), *wv = w.data(), *bv = bs.data(), *mc = m.data(), *rc = rs.data();
    float *sxv = sx.data(), *mgv = mg.data(), *mgxv = mgx.data(), *gb = g_buf.data();
    float *amv = am.data(), *rtv = rt.data(), *wtv = wt.data(), *btv = bt.data();
    float *sg = s_g.data(), *sgx = s_gx.data(), *sxx = s_x.data();
    for (int64_t b = begin; b < end; ++b) {
      const int64_t off = b * n;
      for (int64_t c = 0; c < C; ++c) {
        av[c] = add ? add[b * C + c] : 0.0f;
        wv[c] = weight ? weight[c] : 1.0f;
        bv[c] = bias ? bias[c] : 0.0f;
      }
      per_channel(p, mean_in + b * p.groups, mc);
      per_channel(p, rstd_in + b * p.groups, rc);
      for (int64_t c = 0; c < C; ++c) mgv[c] = av[c] - mc[c];  // a - mean, tiled below
      tile(mgv, C, k, amv);
      tile(rc, C, k, rtv);
      tile(wv, C, k, wtv);
      tile(bv, C, k, btv);
      std::fill(s_g.begin(), s_g.end(), 0.0f);
      std::fill(s_gx.begin(), s_gx.end(), 0.0f);
      std::fill(s_x.begin(), s_x.end(), 0.0f);

      // Pass 1: g into the buffer, per-channel sums of g, g * xhat and xhat.
      for (int64_t j0 = 0; j0 < n; j0 += L) {
        const T* xr = x + off + j0;
        const T* dyr = dy + off + j0;
        float* gr = gb + j0;
        const int64_t len = std::min(L, n - j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float xh = (static_cast<float>(xr[j]) + amv[j]) * rtv[j];
          const float g = static_cast<float>(dyr[j]) * act_grad<A>(xh * wtv[j] + btv[j]);
          gr[j] = g;
          sg[j] += g;
          sgx[j] += g * xh;
          sxx[j] += xh;
        }
      }
      float *dbv = db + b * C, *dsxv = dsx + b * C;
      fold(sg, C, k, dbv);
      fold(sgx, C, k, dsxv);
      fold(sxx, C, k, sxv);

      const double gn = static_cast<double>(p.group_numel());
      for (int64_t g = 0; g < p.groups; ++g) {
        double m1 = 0.0, m2 = 0.0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          m1 += static_cast<double>(wv[c]) * dbv[c];
          m2 += static_cast<double>(wv[c]) * dsxv[c];
        }
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          mgv[c] = static_cast<float>(m1 / gn);
          mgxv[c] = static_cast<float>(m2 / gn);
        }
      }
      float *mgtv = mgt.data(), *mgxtv = mgxt.data();
      tile(mgv, C, k, mgtv);
      tile(mgxv, C, k, mgxtv);

      // Pass 2: grad_x = rstd * (g * w - mean_g - xhat * mean_gx), xhat recomputed.
      float* r = row.data();
      for (int64_t j0 = 0; j0 < n; j0 += L) {
        const T* xr = x + off + j0;
        const float* gr = gb + j0;
        const int64_t len = std::min(L, n - j0);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const float xh = (static_cast<float>(xr[j]) + amv[j]) * rtv[j];
          r[j] = rtv[j] * (gr[j] * wtv[j] - mgtv[j] - xh * mgxtv[j]);
        }
        store_row(r, dx + off + j0, len);
      }
      // sum_hw grad_x in closed form, from the sums above.
      for (int64_t c = 0; c < C; ++c) {
        dadd[b * C + c] = rc[c] * (wv[c] * dbv[c] - hw * mgv[c] - mgxv[c] * sxv[c]);
      }
    }
  });
}

// Calls f(Act-constant, bool-constant) for the runtime activation and layout (true: channels_last).
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
      constexpr Act A = decltype(a)::value;
      auto kernel = decltype(cl)::value ? forward_cl<scalar_t, A> : forward_nchw<scalar_t, A>;
      kernel(p, x.const_data_ptr<scalar_t>(), ptr_or_null<float>(add), ptr_or_null<float>(weight),
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
      constexpr Act A = decltype(a)::value;
      auto kernel = decltype(cl)::value ? backward_cl<scalar_t, A> : backward_nchw<scalar_t, A>;
      kernel(p, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<float>(),
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
