// The reverse-step update, CUDA kernel. Each thread produces four consecutive elements, the four
// normals of one Philox block (philox.h, shared with the CPU kernel, so both draw the same noise).
// coef and seed are read from device memory inside the kernel, so a captured CUDA graph replays
// with whatever coefficient row and seed they hold at replay time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
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
    update_kernel(const T* __restrict__ x, const E* __restrict__ eps, const float* __restrict__ noise,
                  const int64_t* __restrict__ seed, const float* __restrict__ coef_in, bool clip,
                  T* __restrict__ out, int64_t n) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i0 = blk * 4;
  if (i0 >= n) return;
  float coef[5];
#pragma unroll
  for (int c = 0; c < 5; ++c) coef[c] = coef_in[c];
  float z[4];
  if (noise == nullptr) philox_normal4(static_cast<uint64_t>(*seed), static_cast<uint64_t>(blk), z);
  if constexpr (VEC4) {
    const Pack<T, 4> px = load_pack<T, 4>(x + i0);
    const Pack<E, 4> pe = load_pack<E, 4>(eps + i0);
    if (noise != nullptr) {
      const Pack<float, 4> pz = load_pack<float, 4>(noise + i0);
#pragma unroll
      for (int e = 0; e < 4; ++e) z[e] = pz.v[e];
    }
    Pack<T, 4> po;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      po.v[e] = static_cast<T>(
          sampling_update_element(static_cast<float>(px.v[e]), static_cast<float>(pe.v[e]), z[e], coef, clip));
    }
    store_pack<T, 4>(out + i0, po);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = i0 + e;
      if (i < n) {
        const float zi = noise != nullptr ? noise[i] : z[e];
        out[i] = static_cast<T>(
            sampling_update_element(static_cast<float>(x[i]), static_cast<float>(eps[i]), zi, coef, clip));
      }
    }
  }
}

bool aligned(const at::Tensor& t, int64_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

at::Tensor sampling_update_cuda(const at::Tensor& x_t_in, const at::Tensor& eps_in, const at::Tensor& coef_in,
                                bool clip_x0, const std::optional<at::Tensor>& noise_in,
                                const std::optional<at::Tensor>& seed_in) {
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  SamplingInputs in = sampling_inputs(x_t_in, eps_in, coef_in, noise_in, seed_in);
  const at::Tensor &x_t = in.x_t, &eps = in.eps, &coef = in.coef, &noise = in.noise, &seed = in.seed;
  at::Tensor& out = in.out;
  const bool has_noise = in.has_noise();
  const int64_t n = x_t.numel();
  if (n == 0) return out;
  const int64_t blocks = (n + 4 * kThreads - 1) / (4 * kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "sampling_update: tensor too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t.scalar_type(), "sampling_update_cuda", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps.scalar_type(), "sampling_update_cuda_eps", [&] {
      using E = scalar_t;
      const bool vec4 = n % 4 == 0 && aligned(x_t, 4 * sizeof(T)) && aligned(out, 4 * sizeof(T)) &&
                        aligned(eps, 4 * sizeof(E)) && aligned(noise, 16);
      auto kernel = vec4 ? update_kernel<T, E, true> : update_kernel<T, E, false>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x_t.const_data_ptr<T>(), eps.const_data_ptr<E>(), has_noise ? noise.const_data_ptr<float>() : nullptr,
          has_noise ? nullptr : seed.const_data_ptr<int64_t>(), coef.const_data_ptr<float>(), clip_x0,
          out.mutable_data_ptr<T>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("sampling_update", &sampling_update_cuda); }

}  // namespace ddpm_fast
