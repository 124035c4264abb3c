// Dropout, CPU kernel, as aten::native_dropout: (y, mask) with y_i = x_i / (1 - p) where element i
// is kept, else 0, and mask_i whether it is. The elements go in chunks of 64 by memory position in
// x's layout (layout.h): element i = 64 c + 16 w + l of chunk c is kept when word w of
// Philox4x32-10 (philox.h's rounds) at counter (16 c + l, 0) under the key `seed` is below
// (1 - p) 2^32. ATen's CPU dropout draws its mask by bernoulli_, one element at a time on one
// thread; here the chunks run in parallel, and the 16 Philox blocks of a chunk and its 64 selects
// are vector loops. The backward is ATen's native_dropout_backward (ddpm_fast/ops/cpp.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "float_rows.h"
#include "layout.h"
#include "ops.h"
#include "philox.h"

namespace ddpm_fast {
namespace {

constexpr int64_t kLanes = 16;  // Philox blocks a chunk draws, side by side: 64 elements

// The four words of the blocks at counters (first + l, 0), l < kLanes, under (k0, k1): the rounds of
// philox4x32_10, lane by lane, so that each is one vector loop. The 32-bit words sit in 64-bit lanes,
// masked, so that the products need no widening shuffles.
void philox_lanes(uint64_t first, uint32_t k0, uint32_t k1, uint32_t words[4][kLanes]) {
  constexpr uint64_t kLow = 0xFFFFFFFFull;
  uint64_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    const uint64_t blk = first + static_cast<uint64_t>(l);
    c0[l] = blk & kLow;
    c1[l] = blk >> 32;
    c2[l] = c3[l] = 0u;
  }
  uint64_t key0 = k0, key1 = k1;
  for (int round = 0; round < 10; ++round) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const uint64_t p0 = (c0[l] & kLow) * 0xD2511F53ull;
      const uint64_t p1 = (c2[l] & kLow) * 0xCD9E8D57ull;
      const uint64_t n0 = (p1 >> 32) ^ c1[l] ^ key0;
      const uint64_t n2 = (p0 >> 32) ^ c3[l] ^ key1;
      c1[l] = p1 & kLow;
      c3[l] = p0 & kLow;
      c0[l] = n0;
      c2[l] = n2;
    }
    key0 = (key0 + 0x9E3779B9u) & kLow;  // the Weyl key schedule
    key1 = (key1 + 0xBB67AE85u) & kLow;
  }
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    words[0][l] = static_cast<uint32_t>(c0[l]);
    words[1][l] = static_cast<uint32_t>(c1[l]);
    words[2][l] = static_cast<uint32_t>(c2[l]);
    words[3][l] = static_cast<uint32_t>(c3[l]);
  }
}

template <typename T>
void dropout_kernel(const T* x, T* y, bool* mask, int64_t n, uint64_t seed, uint32_t threshold, bool keep_all,
                    float scale) {
  constexpr int64_t kChunk = 4 * kLanes;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  at::parallel_for(0, chunks, 64, [&](int64_t begin, int64_t end) {
    uint32_t words[4][kLanes];
    float vals[kChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      philox_lanes(static_cast<uint64_t>(chunk * kLanes), k0, k1, words);
      const uint32_t* word = &words[0][0];  // element j of the chunk: word j / kLanes of lane j % kLanes
      const int64_t i0 = chunk * kChunk, len = std::min(kChunk, n - i0);
      const T* xs = x + i0;
      bool* ms = mask + i0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const bool keep = (word[j] < threshold) | keep_all;
        ms[j] = keep;
        const float v = load_float(xs[j]) * scale;  // loaded whatever keep: a select, no branch
        vals[j] = keep ? v : 0.0f;
      }
      store_row(vals, y + i0, len);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "dropout: p must be in [0, 1], got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout: seed must be one int64");
  const at::Tensor in = x.contiguous(memory_format_of(x));
  at::Tensor out = at::empty_like(in, in.options(), memory_format_of(in));
  at::Tensor mask = at::empty_like(in, in.options().dtype(at::kBool), memory_format_of(in));
  const uint64_t s = static_cast<uint64_t>(seed.cpu().const_data_ptr<int64_t>()[0]);
  // kept when the word is below (1 - p) 2^32; at p = 0 that bound, 2^32, is no word's: keep_all
  const uint64_t bound = static_cast<uint64_t>(std::llround((1.0 - p) * 4294967296.0));
  const float scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "dropout_cpu", [&] {
    dropout_kernel<scalar_t>(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             mask.mutable_data_ptr<bool>(), in.numel(), s,
                             static_cast<uint32_t>(std::min<uint64_t>(bound, 0xFFFFFFFFull)), bound > 0xFFFFFFFFull,
                             scale);
  });
  return {out, mask};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace ddpm_fast
