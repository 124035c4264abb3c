// Every schema of the ddpm_fast operator library, in one place. The kernels register
// themselves per device: group_norm_act.cpp / sampling_update.cpp / dropout.cpp (CPU) and the .cu
// files (CUDA).
// Fake (meta) kernels and autograd are registered from Python, in ddpm_fast/ops/cpp.py.
#include <torch/library.h>

TORCH_LIBRARY(ddpm_fast, m) {
  // act: "none" | "silu" | "hardswish". Returns (y, mean, rstd); mean and rstd are (B, G) float32.
  m.def(
      "group_norm_act_forward(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, Tensor? add, "
      "str act) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_add); the last three in float32.
  m.def(
      "group_norm_act_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, int num_groups, Tensor? weight, "
      "Tensor? bias, Tensor? add, str act) -> (Tensor, Tensor, Tensor, Tensor)");
  // coef: float32 (9,) [c1, c2, a, b0, b1, b2, b3, sigma, r]; history: at most three tensors; base
  // defaults to x; seed: int64 (1,), used when noise is None. coef and seed are read inside the
  // kernel, so a captured CUDA graph replays with whatever they hold. Returns (out, x0).
  m.def(
      "sampling_update(Tensor x, Tensor model_out, Tensor coef, bool clip_x0, Tensor[] history, Tensor? base, "
      "Tensor? noise, Tensor? seed) -> (Tensor, Tensor)");
  // As aten::native_dropout: (x / (1 - p) where kept, else 0; the bool mask of the kept), the mask a
  // function of (seed, memory position in x's layout). seed: int64 (1,). CPU only.
  m.def("dropout(Tensor x, float p, Tensor seed) -> (Tensor, Tensor)");
}
