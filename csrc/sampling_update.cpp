// The reverse-step update, CPU kernel: one pass over x_t, eps and the noise. eps, noise and the
// output take x_t's layout (layout.h); in-kernel noise is indexed by memory position in it and
// comes from philox.h, the same generator as the CUDA kernel, in blocks of four elements.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

#include "ops.h"
#include "philox.h"
#include "sampling_update.h"

namespace ddpm_fast {
namespace {

template <typename T, typename E>
void update_kernel(const T* x, const E* eps, const float* noise, uint64_t seed, const float* coef, bool clip,
                   T* out, int64_t n) {
  const int64_t blocks = (n + 3) / 4;
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      float z[4];
      if (!noise) philox_normal4(seed, static_cast<uint64_t>(blk), z);
      const int64_t i0 = blk * 4, i1 = std::min(i0 + 4, n);
      for (int64_t i = i0; i < i1; ++i) {
        const float zi = noise ? noise[i] : z[i - i0];
        out[i] = static_cast<T>(
            sampling_update_element(static_cast<float>(x[i]), static_cast<float>(eps[i]), zi, coef, clip));
      }
    }
  });
}

}  // namespace

at::Tensor sampling_update_cpu(const at::Tensor& x_t_in, const at::Tensor& eps_in, const at::Tensor& coef_in,
                               bool clip_x0, const std::optional<at::Tensor>& noise_in,
                               const std::optional<at::Tensor>& seed) {
  SamplingInputs in = sampling_inputs(x_t_in, eps_in, coef_in, noise_in, seed);
  const at::Tensor &x_t = in.x_t, &eps = in.eps, &coef = in.coef, &noise = in.noise;
  at::Tensor& out = in.out;
  const bool has_noise = in.has_noise();
  const uint64_t s = has_noise ? 0 : static_cast<uint64_t>(in.seed.data_ptr<int64_t>()[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_t.scalar_type(), "sampling_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, eps.scalar_type(), "sampling_update_cpu_eps", [&] {
      update_kernel<T, scalar_t>(x_t.const_data_ptr<T>(), eps.const_data_ptr<scalar_t>(),
                                 has_noise ? noise.const_data_ptr<float>() : nullptr, s,
                                 coef.const_data_ptr<float>(), clip_x0, out.mutable_data_ptr<T>(), x_t.numel());
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("sampling_update", &sampling_update_cpu); }

}  // namespace ddpm_fast
