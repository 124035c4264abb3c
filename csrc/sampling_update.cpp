// The sampling update, CPU kernel: one pass over x, model_out and the optional inputs. Every
// input and both outputs take x's layout (layout.h); in-kernel noise is indexed by memory
// position in it and comes from philox.h, the same generator as the CUDA kernel, in blocks of
// four elements.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ops.h"
#include "philox.h"
#include "sampling_update.h"

namespace ddpm_fast {
namespace {

template <typename T, typename E>
void update_kernel(const T* x, const E* mo, const SamplingExtras<T>& ex, const float* noise, uint64_t seed,
                   const float* coef, bool clip, T* out, T* x0_out, int64_t n) {
  const int64_t blocks = (n + 3) / 4;
  at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      float z[4];
      if (!noise) philox_normal4(seed, static_cast<uint64_t>(blk), z);
      const int64_t i0 = blk * 4, i1 = std::min(i0 + 4, n);
      for (int64_t i = i0; i < i1; ++i) {
        const float xi = static_cast<float>(x[i]);
        const float x0 = sampling_x0(xi, static_cast<float>(mo[i]), coef), xc = sampling_clip(x0, clip);
        float h[kMaxHistory] = {};
        for (int k = 0; k < ex.n_hist; ++k) h[k] = static_cast<float>(ex.history[k][i]);
        const float base = ex.base ? static_cast<float>(ex.base[i]) : xi;
        out[i] = static_cast<T>(sampling_out(base, x0, xc, h, ex.n_hist, noise ? noise[i] : z[i - i0], coef));
        x0_out[i] = static_cast<T>(xc);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sampling_update_cpu(const at::Tensor& x, const at::Tensor& model_out,
                                                       const at::Tensor& coef, bool clip_x0, at::TensorList history,
                                                       const std::optional<at::Tensor>& base,
                                                       const std::optional<at::Tensor>& noise,
                                                       const std::optional<at::Tensor>& seed) {
  const SamplingInputs in = sampling_inputs(x, model_out, coef, history, base, noise, seed);
  const uint64_t s = in.has_noise() ? 0 : static_cast<uint64_t>(in.seed.const_data_ptr<int64_t>()[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.x.scalar_type(), "sampling_update_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.model_out.scalar_type(), "sampling_update_cpu_mo", [&] {
      update_kernel<T, scalar_t>(in.x.const_data_ptr<T>(), in.model_out.const_data_ptr<scalar_t>(), in.extras<T>(),
                                 in.has_noise() ? in.noise.const_data_ptr<float>() : nullptr, s,
                                 in.coef.const_data_ptr<float>(), clip_x0, in.out.mutable_data_ptr<T>(),
                                 in.x0.mutable_data_ptr<T>(), in.x.numel());
    });
  });
  return {in.out, in.x0};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("sampling_update", &sampling_update_cpu); }

}  // namespace ddpm_fast
