// fp32 products of a few rows with a linear weight, for the engine's decode steps on AVX2 CPUs
// (engine/small_rows.py builds and loads this file).
//
// The weight is packed once into panels of 16 output columns, [N / 16][K][16], so a panel is one
// sequential stream. Each panel is multiplied by the rows six at a time (12 accumulators of 8
// floats), and while the first six rows run, the next panel is prefetched: the weight's stream
// overlaps the FMAs instead of preceding them. Every output is one fused multiply-add chain over
// k = 0..K-1 in order, so a row's result does not depend on which rows share the product.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kPanel = 16;

// P: prefetch `prefetch` (the next panel) while these rows run.
template <int R, bool P>
inline void panel_rows(const float* __restrict x, int64_t K, const float* __restrict b, float* __restrict y, int64_t N,
                       const float* __restrict prefetch) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* x0 = x;
  const float* x1 = x + K;
  const float* x2 = x + 2 * K;
  const float* x3 = x + 3 * K;
  const float* x4 = x + 4 * K;
  const float* x5 = x + 5 * K;
  for (int64_t k = 0; k < K; ++k) {
    if (P) _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * kPanel), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(b + k * kPanel);
    const __m256 b1 = _mm256_loadu_ps(b + k * kPanel + 8);
    __m256 a = _mm256_broadcast_ss(x0 + k);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    if (R > 1) { a = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11); }
    if (R > 2) { a = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21); }
    if (R > 3) { a = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31); }
    if (R > 4) { a = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41); }
    if (R > 5) { a = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51); }
  }
  _mm256_storeu_ps(y, c00);
  _mm256_storeu_ps(y + 8, c01);
  if (R > 1) { _mm256_storeu_ps(y + N, c10); _mm256_storeu_ps(y + N + 8, c11); }
  if (R > 2) { _mm256_storeu_ps(y + 2 * N, c20); _mm256_storeu_ps(y + 2 * N + 8, c21); }
  if (R > 3) { _mm256_storeu_ps(y + 3 * N, c30); _mm256_storeu_ps(y + 3 * N + 8, c31); }
  if (R > 4) { _mm256_storeu_ps(y + 4 * N, c40); _mm256_storeu_ps(y + 4 * N + 8, c41); }
  if (R > 5) { _mm256_storeu_ps(y + 5 * N, c50); _mm256_storeu_ps(y + 5 * N + 8, c51); }
}

}  // namespace

// weight [N, K] (N a multiple of 16) -> panels [N / 16, K, 16]
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32 && weight.device().is_cpu(),
              "small_rows.pack takes a 2-d float32 CPU weight");
  TORCH_CHECK(weight.size(0) % kPanel == 0, "small_rows.pack needs a multiple of 16 output columns");
  const int64_t n = weight.size(0), k = weight.size(1);
  return weight.detach().reshape({n / kPanel, kPanel, k}).transpose(1, 2).contiguous();
}

// x [M, K] (contiguous) times the packed weight: [M, N]
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& panels) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "small_rows.linear takes contiguous 2-d float32 CPU rows");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == kPanel && panels.size(1) == x.size(1) && panels.is_contiguous(),
              "small_rows.linear: the weight is not packed for rows of this width");
  const int64_t m = x.size(0), k = x.size(1), count = panels.size(0), n = count * kPanel;
  auto y = torch::empty({m, n}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* ps = panels.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const float* b = ps + j * k * kPanel;
      // The first rows (up to six) prefetch the next panel of this thread's share; the later
      // ones find this panel in cache.
      const float* next = j + 1 < last ? b + k * kPanel : nullptr;
      float* out = ys + j * kPanel;
      int64_t r = 0;
      for (; r + 6 <= m; r += 6) {
        if (r == 0 && next != nullptr) panel_rows<6, true>(xs, k, b, out, n, next);
        else panel_rows<6, false>(xs + r * k, k, b, out + r * n, n, nullptr);
      }
      const bool first = r == 0 && next != nullptr;
      switch (m - r) {
        case 5: first ? panel_rows<5, true>(xs, k, b, out, n, next) : panel_rows<5, false>(xs + r * k, k, b, out + r * n, n, nullptr); break;
        case 4: first ? panel_rows<4, true>(xs, k, b, out, n, next) : panel_rows<4, false>(xs + r * k, k, b, out + r * n, n, nullptr); break;
        case 3: first ? panel_rows<3, true>(xs, k, b, out, n, next) : panel_rows<3, false>(xs + r * k, k, b, out + r * n, n, nullptr); break;
        case 2: first ? panel_rows<2, true>(xs, k, b, out, n, next) : panel_rows<2, false>(xs + r * k, k, b, out + r * n, n, nullptr); break;
        case 1: first ? panel_rows<1, true>(xs, k, b, out, n, next) : panel_rows<1, false>(xs + r * k, k, b, out + r * n, n, nullptr); break;
        default: break;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "weight [N, K] -> panels [N / 16, K, 16]");
  m.def("linear", &linear, "x [M, K] @ weight.T from its panels");
}
