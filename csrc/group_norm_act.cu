// GroupNorm + activation, CUDA kernels. One block per (batch, group). Where the group fits in
// shared memory it is read from global memory once and every later pass reads the cached float
// copy; otherwise the passes re-read global memory (the looped fallback, same code path).
// Loads and stores move 16 bytes at a time where the layout allows: in NCHW the group is one
// contiguous span; in channels_last it is H*W rows of Cg contiguous channels, C apart.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <initializer_list>

#include "cuda_utils.cuh"
#include "group_norm_act.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;
// Blocks per SM the register allocation must allow: two, as the shared-memory cache allows (a
// tighter bound made ptxas spill the backward kernel's per-channel accumulators).
constexpr int kMinBlocks = 2;
// Shared memory a block may use to hold its group (opted in above the 48 KiB default); two such
// blocks still fit on an SM of sm_80/sm_90.
constexpr int64_t kCacheBytes = 96 * 1024;

struct Group {
  int64_t base;       // offset of the group's first element
  int64_t channel0;   // its first channel
  int64_t b;          // batch index
};

// Within a group, indices are 32-bit (a group over 2^31 elements is rejected on the host).
struct Shape {
  int64_t channels;
  int hw, groups, group_channels, numel;  // numel: elements of one group
};

__device__ __forceinline__ Group block_group(const Shape& s, bool channels_last) {
  const int64_t bg = blockIdx.x, b = bg / s.groups, c0 = (bg % s.groups) * s.group_channels;
  return {channels_last ? b * s.hw * s.channels + c0 : (b * s.channels + c0) * s.hw, c0, b};
}

// Offset of element j of the group (j runs channel-major in NCHW, pixel-major in channels_last)
// and its channel within the group. A pack of V elements starting at a multiple of V lies in one
// row whenever vectorisation is enabled (see vector_width).
template <bool CL>
__device__ __forceinline__ int64_t element_offset(const Shape& s, const Group& g, int j) {
  return CL ? g.base + (j / s.group_channels) * s.channels + j % s.group_channels : g.base + j;
}
template <bool CL>
__device__ __forceinline__ int channel_of(const Shape& s, int j) {
  return CL ? j % s.group_channels : j / s.hw;
}

// Per-group parameters staged in shared memory: add (as a shift), weight and bias of each channel.
__device__ __forceinline__ void stage_params(const Shape& s, const Group& g, const float* add, const float* weight,
                                             const float* bias, float* a_s, float* w_s, float* b_s) {
  for (int cl = threadIdx.x; cl < s.group_channels; cl += blockDim.x) {
    const int64_t c = g.channel0 + cl;
    a_s[cl] = add ? add[g.b * s.channels + c] : 0.0f;
    w_s[cl] = weight ? weight[c] : 1.0f;
    b_s[cl] = bias ? bias[c] : 0.0f;
  }
  __syncthreads();
}

// Dynamic shared memory: [cache: cached_floats][add, weight, bias: 3 * Cg].
template <typename T, Act A, bool CL, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_kernel(const T* __restrict__ x, const float* __restrict__ add, const float* __restrict__ weight,
                   const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean_out,
                   float* __restrict__ rstd_out, Shape s, float eps, bool cached) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  float* cache = smem;
  float* a_s = smem + (cached ? s.numel : 0);
  float* w_s = a_s + s.group_channels;
  float* b_s = w_s + s.group_channels;
  const Group g = block_group(s, CL);
  stage_params(s, g, add, weight, bias, a_s, w_s, b_s);
  const int packs = s.numel / V;

  // Pass 1: the mean of h = x + add, caching h.
  float sum = 0.0f;
  for (int k = threadIdx.x; k < packs; k += blockDim.x) {
    const int j0 = k * V;
    const Pack<T, V> p = load_pack<T, V>(x + element_offset<CL>(s, g, j0));
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float h = static_cast<float>(p.v[e]) + a_s[channel_of<CL>(s, j0 + e)];
      sum += h;
      if (cached) cache[j0 + e] = h;
    }
  }
  const float mean = block_sum(sum, scratch) / s.numel;

  // Pass 2: the centred second moment (exact where |mean| >> std, unlike E[h^2] - mean^2).
  float sq = 0.0f;
  for (int k = threadIdx.x; k < packs; k += blockDim.x) {
    const int j0 = k * V;
    Pack<T, V> p;
    if (!cached) p = load_pack<T, V>(x + element_offset<CL>(s, g, j0));
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float h = cached ? cache[j0 + e] : static_cast<float>(p.v[e]) + a_s[channel_of<CL>(s, j0 + e)];
      sq += (h - mean) * (h - mean);
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / s.numel + eps);
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }

  // Pass 3: y = act((h - mean) * rstd * w + b).
  for (int k = threadIdx.x; k < packs; k += blockDim.x) {
    const int j0 = k * V;
    const int64_t off = element_offset<CL>(s, g, j0);
    Pack<T, V> p;
    if (!cached) p = load_pack<T, V>(x + off);
    Pack<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int cl = channel_of<CL>(s, j0 + e);
      const float h = cached ? cache[j0 + e] : static_cast<float>(p.v[e]) + a_s[cl];
      out.v[e] = static_cast<T>(act_forward<A>((h - mean) * rstd * w_s[cl] + b_s[cl]));
    }
    store_pack<T, V>(y + off, out);
  }
}

// With xhat = (h - mean) * rstd, yp = xhat * w + b and gr = dy * act'(yp):
//   dx = rstd * (gr * w - mean(gr * w) - xhat * mean(gr * w * xhat))   (means over the group)
// and per (b, c): db = sum_hw gr, dsx = sum_hw gr * xhat, dadd = sum_hw dx (closed form below).
// Per-channel sums are kept per thread while a thread's channel does not change and flushed to
// shared memory with atomics when it does (in NCHW that is rarely; in channels_last never when
// the block's stride is a multiple of Cg).
// Dynamic shared memory: [cache: 2 * numel when cached (gr, xhat)][a, w, b, db, dsx, sx: 6 * Cg].
template <typename T, Act A, bool CL, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean_in,
                    const float* __restrict__ rstd_in, const float* __restrict__ add,
                    const float* __restrict__ weight, const float* __restrict__ bias, T* __restrict__ dx,
                    float* __restrict__ db_out, float* __restrict__ dsx_out, float* __restrict__ dadd_out, Shape s,
                    bool cached) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  float* gr_cache = smem;
  float* xhat_cache = smem + (cached ? s.numel : 0);
  float* a_s = smem + (cached ? 2 * s.numel : 0);
  float* w_s = a_s + s.group_channels;
  float* b_s = w_s + s.group_channels;
  float* db_s = b_s + s.group_channels;
  float* dsx_s = db_s + s.group_channels;
  float* sx_s = dsx_s + s.group_channels;
  const Group g = block_group(s, CL);
  for (int cl = threadIdx.x; cl < s.group_channels; cl += blockDim.x) db_s[cl] = dsx_s[cl] = sx_s[cl] = 0.0f;
  stage_params(s, g, add, weight, bias, a_s, w_s, b_s);
  const float mean = mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
  const int packs = s.numel / V;

  // Pass 1: per-channel sums of gr, gr * xhat and xhat.
  int cur[V];
  float acc_g[V], acc_gx[V], acc_x[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    cur[e] = -1;
    acc_g[e] = acc_gx[e] = acc_x[e] = 0.0f;
  }
  auto flush = [&](int e) {
    if (cur[e] >= 0) {
      atomicAdd(db_s + cur[e], acc_g[e]);
      atomicAdd(dsx_s + cur[e], acc_gx[e]);
      atomicAdd(sx_s + cur[e], acc_x[e]);
    }
    acc_g[e] = acc_gx[e] = acc_x[e] = 0.0f;
  };
  for (int k = threadIdx.x; k < packs; k += blockDim.x) {
    const int j0 = k * V;
    const int64_t off = element_offset<CL>(s, g, j0);
    const Pack<T, V> pd = load_pack<T, V>(dy + off);
    const Pack<T, V> px = load_pack<T, V>(x + off);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int cl = channel_of<CL>(s, j0 + e);
      if (cl != cur[e]) {
        flush(e);
        cur[e] = cl;
      }
      const float xhat = (static_cast<float>(px.v[e]) + a_s[cl] - mean) * rstd;
      const float gr = static_cast<float>(pd.v[e]) * act_grad<A>(xhat * w_s[cl] + b_s[cl]);
      acc_g[e] += gr;
      acc_gx[e] += gr * xhat;
      acc_x[e] += xhat;
      if (cached) {
        gr_cache[j0 + e] = gr;
        xhat_cache[j0 + e] = xhat;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) flush(e);
  __syncthreads();

  float m1 = 0.0f, m2 = 0.0f;
  for (int cl = threadIdx.x; cl < s.group_channels; cl += blockDim.x) {
    m1 += w_s[cl] * db_s[cl];
    m2 += w_s[cl] * dsx_s[cl];
  }
  const float mean_g = block_sum(m1, scratch) / s.numel;
  const float mean_gx = block_sum(m2, scratch) / s.numel;
  for (int cl = threadIdx.x; cl < s.group_channels; cl += blockDim.x) {
    const int64_t bc = g.b * s.channels + g.channel0 + cl;
    db_out[bc] = db_s[cl];
    dsx_out[bc] = dsx_s[cl];
    dadd_out[bc] = rstd * (w_s[cl] * db_s[cl] - s.hw * mean_g - mean_gx * sx_s[cl]);
  }

  // Pass 2: dx.
  for (int k = threadIdx.x; k < packs; k += blockDim.x) {
    const int j0 = k * V;
    const int64_t off = element_offset<CL>(s, g, j0);
    Pack<T, V> pd, px;
    if (!cached) {
      pd = load_pack<T, V>(dy + off);
      px = load_pack<T, V>(x + off);
    }
    Pack<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int cl = channel_of<CL>(s, j0 + e);
      float gr, xhat;
      if (cached) {
        gr = gr_cache[j0 + e];
        xhat = xhat_cache[j0 + e];
      } else {
        xhat = (static_cast<float>(px.v[e]) + a_s[cl] - mean) * rstd;
        gr = static_cast<float>(pd.v[e]) * act_grad<A>(xhat * w_s[cl] + b_s[cl]);
      }
      out.v[e] = static_cast<T>(rstd * (gr * w_s[cl] - mean_g - xhat * mean_gx));
    }
    store_pack<T, V>(dx + off, out);
  }
}

// 16 bytes per access where every pack of the group is one aligned run in memory, else 1.
template <typename T>
int vector_width(const GroupNormProblem& p, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int kVec = 16 / sizeof(T);
  bool aligned = true;
  for (const at::Tensor* t : tensors) aligned = aligned && reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0;
  // NCHW: group starts are multiples of Cg*HW; channels_last: multiples of Cg, rows C apart.
  const bool runs = p.channels_last ? p.group_channels % kVec == 0 && p.channels % kVec == 0
                                    : p.group_numel() % kVec == 0;
  return aligned && runs ? kVec : 1;
}

Shape shape_of(const GroupNormProblem& p) {
  TORCH_CHECK(p.group_numel() < (int64_t{1} << 31), "group_norm_act: a group of ", p.group_numel(),
              " elements is too large for the CUDA kernel");
  return {p.channels, static_cast<int>(p.hw), static_cast<int>(p.groups), static_cast<int>(p.group_channels),
          static_cast<int>(p.group_numel())};
}

// Calls f(Act constant, layout constant, vector-width constant).
template <typename T, typename F>
void dispatch(const GroupNormProblem& p, int vec, F f) {
  auto with_vec = [&](auto act, auto cl) {
    if (vec > 1) {
      f(act, cl, std::integral_constant<int, 16 / sizeof(T)>{});
    } else {
      f(act, cl, std::integral_constant<int, 1>{});
    }
  };
  auto with_layout = [&](auto act) {
    if (p.channels_last) {
      with_vec(act, std::true_type{});
    } else {
      with_vec(act, std::false_type{});
    }
  };
  switch (p.act) {
    case Act::Silu: with_layout(std::integral_constant<Act, Act::Silu>{}); break;
    case Act::Hardswish: with_layout(std::integral_constant<Act, Act::Hardswish>{}); break;
    case Act::None: with_layout(std::integral_constant<Act, Act::None>{}); break;
  }
}

template <typename K>
void launch_config(K kernel, size_t smem_bytes) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x_in, int64_t num_groups,
                                                            const std::optional<at::Tensor>& weight_in,
                                                            const std::optional<at::Tensor>& bias_in, double eps,
                                                            const std::optional<at::Tensor>& add_in,
                                                            std::string_view act) {
  const GroupNormProblem p = gn_problem(x_in, num_groups, act);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = memory_format_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor weight = gn_float_param(weight_in, {p.channels}, "weight", x);
  const at::Tensor bias = gn_float_param(bias_in, {p.channels}, "bias", x);
  const at::Tensor add = gn_float_param(add_in, {p.batch, p.channels}, "add", x);
  at::Tensor y = at::empty_like(x, x.options(), fmt);
  at::Tensor mean = at::empty({p.batch, p.groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({p.batch, p.groups}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean, rstd};
  const bool cached = p.group_numel() * 4 <= kCacheBytes;
  const size_t smem = ((cached ? p.group_numel() : 0) + 3 * p.group_channels) * sizeof(float);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DDPM_DISPATCH_NORM_TYPES(x.scalar_type(), "group_norm_act_forward_cuda", [&] {
    const int vec = vector_width<scalar_t>(p, {&x, &y});
    dispatch<scalar_t>(p, vec, [&](auto a, auto cl, auto v) {
      auto kernel = forward_kernel<scalar_t, decltype(a)::value, decltype(cl)::value, decltype(v)::value>;
      launch_config(kernel, smem);
      kernel<<<p.batch * p.groups, kThreads, smem, stream>>>(
          x.const_data_ptr<scalar_t>(), ptr_or_null(add), ptr_or_null(weight), ptr_or_null(bias),
          y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(),
          shape_of(p), static_cast<float>(eps), cached);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& add_in, std::string_view act) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  GroupNormBackward b = gn_backward(grad_y, x_in, mean, rstd, num_groups, weight_in, bias_in, add_in, act);
  const GroupNormProblem& p = b.p;
  const at::Tensor &x = b.x, &dy = b.dy, &mean_c = b.mean, &rstd_c = b.rstd;
  const at::Tensor &weight = b.weight, &bias = b.bias, &add = b.add;
  at::Tensor &dx = b.dx, &db = b.db, &dsx = b.dsx, &dadd = b.dadd;
  if (x.numel() > 0) {
    const bool cached = p.group_numel() * 8 <= kCacheBytes;
    const size_t smem = ((cached ? 2 * p.group_numel() : 0) + 6 * p.group_channels) * sizeof(float);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    DDPM_DISPATCH_NORM_TYPES(x.scalar_type(), "group_norm_act_backward_cuda", [&] {
      const int vec = vector_width<scalar_t>(p, {&x, &dy, &dx});
      dispatch<scalar_t>(p, vec, [&](auto a, auto cl, auto v) {
        auto kernel = backward_kernel<scalar_t, decltype(a)::value, decltype(cl)::value, decltype(v)::value>;
        launch_config(kernel, smem);
        kernel<<<p.batch * p.groups, kThreads, smem, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean_c.const_data_ptr<float>(),
            rstd_c.const_data_ptr<float>(), ptr_or_null(add), ptr_or_null(weight), ptr_or_null(bias),
            dx.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<float>(), dsx.mutable_data_ptr<float>(),
            dadd.mutable_data_ptr<float>(), shape_of(p), cached);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {dx, dsx.sum(0), db.sum(0), dadd};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_act_forward", &forward_cuda);
  m.impl("group_norm_act_backward", &backward_cuda);
}

}  // namespace ddpm_fast
