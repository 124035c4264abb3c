// CTest executable: the CPU kernels of csrc/ against naive double-precision C++ references.
// GroupNorm gradients are checked against central finite differences of the naive forward, so
// the check does not share the backward formulas it is testing. Exit status 0 = all passed.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "activation.h"
#include "ops.h"
#include "philox.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.8g, want %.8g\n", what, got, want);
  }
}

void check_close(double got, double want, double atol, double rtol, const char* what) {
  check(std::isfinite(got) && std::abs(got - want) <= atol + rtol * std::abs(want), what, got, want);
}

// Known-answer tests from Random123's kat_vectors (philox4x32, 10 rounds).
void test_philox_kat() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const ddpm_fast::Philox4 r = ddpm_fast::philox4x32_10(
        ddpm_fast::Philox4{{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}}, k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) check(r.v[i] == k.out[i], "philox4x32_10 known answer", r.v[i], k.out[i]);
  }
}

double act_d(double v, ddpm_fast::Act a) {
  if (a == ddpm_fast::Act::Silu) return v / (1.0 + std::exp(-v));
  if (a == ddpm_fast::Act::Hardswish) return v * std::min(std::max(v + 3.0, 0.0), 6.0) / 6.0;
  return v;
}

// sum(gy * act(group_norm(x + add) * w + b)), all in double, straight from the definition.
double naive_loss(const std::vector<double>& x, const std::vector<double>& add, const std::vector<double>& w,
                  const std::vector<double>& b, const std::vector<double>& gy, int B, int C, int HW, int G,
                  ddpm_fast::Act a, std::vector<double>* y_out = nullptr) {
  const int cg = C / G;
  double loss = 0;
  if (y_out) y_out->assign(x.size(), 0.0);
  for (int n = 0; n < B; ++n) {
    for (int g = 0; g < G; ++g) {
      double mean = 0, var = 0;
      for (int c = g * cg; c < (g + 1) * cg; ++c)
        for (int s = 0; s < HW; ++s) mean += x[(n * C + c) * HW + s] + add[n * C + c];
      mean /= cg * HW;
      for (int c = g * cg; c < (g + 1) * cg; ++c)
        for (int s = 0; s < HW; ++s) var += std::pow(x[(n * C + c) * HW + s] + add[n * C + c] - mean, 2);
      var /= cg * HW;
      for (int c = g * cg; c < (g + 1) * cg; ++c) {
        for (int s = 0; s < HW; ++s) {
          const int i = (n * C + c) * HW + s;
          const double y = act_d((x[i] + add[n * C + c] - mean) / std::sqrt(var + 1e-5) * w[c] + b[c], a);
          if (y_out) (*y_out)[i] = y;
          loss += gy[i] * y;
        }
      }
    }
  }
  return loss;
}

std::vector<double> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

void test_group_norm(ddpm_fast::Act act, const char* act_name, bool channels_last) {
  const int B = 3, C = 96, G = 32, H = 5, W = 7, HW = H * W;
  at::manual_seed(static_cast<int>(act) + 10 * channels_last);
  at::Tensor x = at::randn({B, C, H, W});
  if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor add = at::randn({B, C}), w = at::randn({C}), b = at::randn({C});
  const at::Tensor gy = at::randn({B, C, H, W});
  auto [y, mean, rstd] = ddpm_fast::group_norm_act_forward_cpu(x, G, w, b, 1e-5, add, act_name);
  auto [dx, dw, db, dadd] = ddpm_fast::group_norm_act_backward_cpu(gy, x, mean, rstd, G, w, b, add, act_name);
  check(y.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
        "group_norm_act output keeps x's memory format");

  const auto xv = to_vec(x), av = to_vec(add), wv = to_vec(w), bv = to_vec(b), gv = to_vec(gy);
  std::vector<double> y_ref;
  naive_loss(xv, av, wv, bv, gv, B, C, HW, G, act, &y_ref);
  const auto yv = to_vec(y);
  for (size_t i = 0; i < yv.size(); ++i) check_close(yv[i], y_ref[i], 1e-5, 1e-5, "group_norm_act forward");

  // d loss / d p[i] by central differences, for a spread of elements of each input.
  auto xs = xv, as = av, ws = wv, bs = bv;  // perturbed in place, one element at a time
  auto fd = [&](std::vector<double>* p, size_t i) {
    const double h = 1e-5, keep = (*p)[i];
    (*p)[i] = keep + h;
    const double up = naive_loss(xs, as, ws, bs, gv, B, C, HW, G, act);
    (*p)[i] = keep - h;
    const double down = naive_loss(xs, as, ws, bs, gv, B, C, HW, G, act);
    (*p)[i] = keep;
    return (up - down) / (2 * h);
  };
  const auto dxv = to_vec(dx), dwv = to_vec(dw), dbv = to_vec(db), dav = to_vec(dadd);
  for (size_t i = 0; i < xs.size(); i += 97) {
    check_close(dxv[i], fd(&xs, i), 2e-3, 2e-3, "group_norm_act grad x");
  }
  for (size_t i = 0; i < ws.size(); i += 7) {
    check_close(dwv[i], fd(&ws, i), 2e-3, 2e-3, "group_norm_act grad weight");
    check_close(dbv[i], fd(&bs, i), 2e-3, 2e-3, "group_norm_act grad bias");
  }
  for (size_t i = 0; i < as.size(); i += 11) {
    check_close(dav[i], fd(&as, i), 2e-3, 2e-3, "group_norm_act grad add");
  }
}

// Every history count, with and without a base, clip on and off, given noise and Philox noise,
// against the row's definition in double; every element of out and x0 checked.
void test_sampling_update() {
  const float coef[9] = {1.3f, 0.4f, 0.7f, 0.2f, -0.35f, 0.15f, 0.05f, 0.5f, -0.45f};
  const at::Tensor coef_t = at::tensor(std::vector<float>(coef, coef + 9));
  const std::vector<int64_t> shape{3, 3, 5, 7};  // 315 elements: not a multiple of four
  const at::Tensor x = at::randn(shape) * 3, mo = at::randn(shape), z = at::randn(shape), base = at::randn(shape);
  const std::vector<at::Tensor> hist{at::randn(shape), at::randn(shape), at::randn(shape)};
  const at::Tensor seed = at::tensor(std::vector<int64_t>{12345});
  const auto xv = to_vec(x), mv = to_vec(mo), zv = to_vec(z), bv = to_vec(base);
  std::vector<std::vector<double>> hv;
  for (const at::Tensor& h : hist) hv.push_back(to_vec(h));
  for (int n_hist = 0; n_hist <= 3; ++n_hist) {
    const at::TensorList h(hist.data(), n_hist);
    for (bool with_base : {false, true}) {
      const std::optional<at::Tensor> b = with_base ? std::optional<at::Tensor>(base) : std::nullopt;
      for (bool clip : {false, true}) {
        const auto [out, x0] = ddpm_fast::sampling_update_cpu(x, mo, coef_t, clip, h, b, z, std::nullopt);
        const auto [out_s, x0_s] = ddpm_fast::sampling_update_cpu(x, mo, coef_t, clip, h, b, std::nullopt, seed);
        const auto ov = to_vec(out), x0v = to_vec(x0), osv = to_vec(out_s), x0sv = to_vec(x0_s);
        for (size_t i = 0; i < xv.size(); ++i) {
          const double raw = coef[0] * xv[i] - coef[1] * mv[i];
          const double want_x0 = clip ? std::min(1.0, std::max(-1.0, raw)) : raw;
          double want = coef[2] * (with_base ? bv[i] : xv[i]) + coef[3] * want_x0 + coef[8] * (raw - want_x0);
          for (int k = 0; k < n_hist; ++k) want += coef[4 + k] * hv[k][i];
          check_close(x0v[i], want_x0, 1e-5, 1e-5, "sampling_update x0");
          check_close(x0sv[i], want_x0, 1e-5, 1e-5, "sampling_update x0 with seed");
          check_close(ov[i], want + coef[7] * zv[i], 1e-5, 1e-5, "sampling_update with noise");
          float z4[4];
          ddpm_fast::philox_normal4(12345, i / 4, z4);
          check_close(osv[i], want + coef[7] * z4[i % 4], 1e-5, 1e-5, "sampling_update with seed");
        }
      }
    }
  }
}

// The vectorised Philox lanes of dropout_cpu against the known-answer-tested philox4x32_10: element
// i = 64 c + 16 w + l is kept when word w at counter 16 c + l is below (1 - p) 2^32; every element
// of the output and mask, a size that is not a multiple of the 64-element chunk.
void test_dropout() {
  const uint64_t seed = 0x123456789abcdefULL;
  const at::Tensor x = at::randn({3, 5, 7, 11});
  const auto xv = to_vec(x);
  for (double p : {0.1, 0.5}) {
    const auto [y, mask] = ddpm_fast::dropout_cpu(x, p, at::tensor(std::vector<int64_t>{static_cast<int64_t>(seed)}));
    const auto yv = to_vec(y);
    const bool* mv = mask.const_data_ptr<bool>();
    const uint64_t bound = static_cast<uint64_t>(std::llround((1.0 - p) * 4294967296.0));
    for (size_t i = 0; i < xv.size(); ++i) {
      const uint64_t c = i / 64, w = (i % 64) / 16, l = i % 16;
      const ddpm_fast::Philox4 r = ddpm_fast::philox4x32_10(
          ddpm_fast::Philox4{{static_cast<uint32_t>(16 * c + l), 0u, 0u, 0u}}, static_cast<uint32_t>(seed),
          static_cast<uint32_t>(seed >> 32));
      const bool keep = r.v[w] < bound;
      check(mv[i] == keep, "dropout mask", mv[i], keep);
      check_close(yv[i], keep ? xv[i] * static_cast<float>(1.0 / (1.0 - p)) : 0.0, 1e-6, 1e-6, "dropout output");
    }
  }
}

}  // namespace

int main() {
  test_philox_kat();
  const std::pair<ddpm_fast::Act, const char*> acts[] = {
      {ddpm_fast::Act::None, "none"}, {ddpm_fast::Act::Silu, "silu"}, {ddpm_fast::Act::Hardswish, "hardswish"}};
  for (const auto& [act, name] : acts) {
    for (bool cl : {false, true}) test_group_norm(act, name, cl);
  }
  test_sampling_update();
  test_dropout();
  std::printf(failures ? "%d checks FAILED\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
