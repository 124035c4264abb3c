// The sampling update, CUDA kernel. Each thread produces four consecutive elements, the four
// normals of one Philox block (philox.h, shared with the CPU kernel, so both draw the same noise).
// coef and seed are read from device memory inside the kernel, so a captured CUDA graph replays
// with whatever coefficient row and seed they hold at replay time. base and the history count are
// run-time arguments: one kernel per dtype pair serves every solver.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "philox.h"
#include "sampling_update.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;

// Four elements at a time: one vector access per tensor when every tensor is aligned for it
// (VEC4) and n is a multiple of 4; otherwise element by element with a bounds check.
template <typename T, typename E, bool VEC4>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const T* __restrict__ x, const E* __restrict__ mo, const SamplingExtras<T> ex,
                  const float* __restrict__ noise, const int64_t* __restrict__ seed,
                  const float* __restrict__ coef_in, bool clip, T* __restrict__ out, T* __restrict__ x0_out,
                  int64_t n) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i0 = blk * 4;
  if (i0 >= n) return;
  float coef[kCoefs];
#pragma unroll
  for (int c = 0; c < kCoefs; ++c) coef[c] = coef_in[c];
  float z[4];
  if (noise == nullptr) philox_normal4(static_cast<uint64_t>(*seed), static_cast<uint64_t>(blk), z);
  if constexpr (VEC4) {
    const Pack<T, 4> px = load_pack<T, 4>(x + i0);
    const Pack<E, 4> pm = load_pack<E, 4>(mo + i0);
    float base[4], h[4][kMaxHistory] = {};
    const Pack<T, 4> pb = ex.base != nullptr ? load_pack<T, 4>(ex.base + i0) : px;
#pragma unroll
    for (int e = 0; e < 4; ++e) base[e] = static_cast<float>(pb.v[e]);
#pragma unroll
    for (int k = 0; k < kMaxHistory; ++k) {
      if (k < ex.n_hist) {
        const Pack<T, 4> ph = load_pack<T, 4>(ex.history[k] + i0);
#pragma unroll
        for (int e = 0; e < 4; ++e) h[e][k] = static_cast<float>(ph.v[e]);
      }
    }
    if (noise != nullptr) {
      const Pack<float, 4> pz = load_pack<float, 4>(noise + i0);
#pragma unroll
      for (int e = 0; e < 4; ++e) z[e] = pz.v[e];
    }
    Pack<T, 4> po, p0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x0 = sampling_x0(static_cast<float>(px.v[e]), static_cast<float>(pm.v[e]), coef);
      const float xc = sampling_clip(x0, clip);
      po.v[e] = static_cast<T>(sampling_out(base[e], x0, xc, h[e], ex.n_hist, z[e], coef));
      p0.v[e] = static_cast<T>(xc);
    }
    store_pack<T, 4>(out + i0, po);
    store_pack<T, 4>(x0_out + i0, p0);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = i0 + e;
      if (i < n) {
        const float xi = static_cast<float>(x[i]);
        const float x0 = sampling_x0(xi, static_cast<float>(mo[i]), coef), xc = sampling_clip(x0, clip);
        float h[kMaxHistory] = {};
#pragma unroll
        for (int k = 0; k < kMaxHistory; ++k) {
          if (k < ex.n_hist) h[k] = static_cast<float>(ex.history[k][i]);
        }
        const float base = ex.base != nullptr ? static_cast<float>(ex.base[i]) : xi;
        out[i] = static_cast<T>(sampling_out(base, x0, xc, h, ex.n_hist, noise != nullptr ? noise[i] : z[e], coef));
        x0_out[i] = static_cast<T>(xc);
      }
    }
  }
}

bool aligned(const at::Tensor& t, int64_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

std::tuple<at::Tensor, at::Tensor> sampling_update_cuda(const at::Tensor& x_in, const at::Tensor& model_out_in,
                                                        const at::Tensor& coef_in, bool clip_x0,
                                                        at::TensorList history_in,
                                                        const std::optional<at::Tensor>& base_in,
                                                        const std::optional<at::Tensor>& noise_in,
                                                        const std::optional<at::Tensor>& seed_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const SamplingInputs in = sampling_inputs(x_in, model_out_in, coef_in, history_in, base_in, noise_in, seed_in);
  const int64_t n = in.x.numel();
  if (n == 0) return {in.out, in.x0};
  const int64_t blocks = (n + 4 * kThreads - 1) / (4 * kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "sampling_update: tensor too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "sampling_update_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.model_out.scalar_type(), "sampling_update_cuda_mo", [&] {
      using E = scalar_t;
      bool vec4 = n % 4 == 0 && aligned(in.x, 4 * sizeof(T)) && aligned(in.out, 4 * sizeof(T)) &&
                  aligned(in.x0, 4 * sizeof(T)) && aligned(in.model_out, 4 * sizeof(E)) &&
                  aligned(in.base, 4 * sizeof(T)) && aligned(in.noise, 16);
      for (const at::Tensor& h : in.history) vec4 = vec4 && aligned(h, 4 * sizeof(T));
      auto kernel = vec4 ? update_kernel<T, E, true> : update_kernel<T, E, false>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          in.x.const_data_ptr<T>(), in.model_out.const_data_ptr<E>(), in.extras<T>(),
          in.has_noise() ? in.noise.const_data_ptr<float>() : nullptr,
          in.has_noise() ? nullptr : in.seed.const_data_ptr<int64_t>(), in.coef.const_data_ptr<float>(), clip_x0,
          in.out.mutable_data_ptr<T>(), in.x0.mutable_data_ptr<T>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {in.out, in.x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("sampling_update", &sampling_update_cuda); }

}  // namespace ddpm_fast
