// The per-element math of every fused proxy loss, written once for the CPU and the GPU.
//
// Each kernel is a struct that holds its arguments (plain pointers and sizes); its
// operator()(block, thread, block_dim) is the whole work of one CUDA thread. csrc/cuda/launch.cu
// runs it as a CUDA kernel; csrc/cpu/launch.cpp walks the same launch grid block by block, so the
// index arithmetic, bounds checks and epilogues that the GPU runs are the ones CI runs. The math
// and its notation are docs/losses.md §0 and §7; how the drivers tile the work is csrc/tiles.h.
//
// T is the accumulation type: float for float32, bfloat16 and float16 inputs, double for float64
// (gradcheck); proxies are read in T. Other template parameters are storage types: the
// embeddings' (In), the GEMMs' (G, O, S) and the embeddings' gradient's (Out).
//
// Raw proxies (docs/losses.md §7.1): a tile's GEMM gives S_bc = x_hat_b . p_c on the proxies as
// they are; the cosine is S_bc / m_c with m_c = sqrt(||p_c||^2 + eps). With G = dL/dcos and
// G' = G / m_c, dL/dx_hat = G' P and dL/dp_c = sum_b G'_bc x_hat_b - kappa_c p_c, where
// kappa_c = sum_b G_bc cos_bc / m_c^2. That is the normalization backward (1/m)(g - (p_hat . g) p_hat)
// of g = sum_b G_bc x_hat_b, because p_hat . g = sum_b G_bc cos_bc: no normalized copy of P and
// no projection pass over it are needed.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "cpu/exp_runs.h"

#ifdef __CUDACC__
#define DMLFAST_HD __host__ __device__ __forceinline__
#else
#define DMLFAST_HD inline
#endif

namespace dmlfast {

// Overloads that keep float math in float and double math in double on both compilers.
namespace math {
DMLFAST_HD float exp(float x) { return expf(x); }
DMLFAST_HD double exp(double x) { return ::exp(x); }
DMLFAST_HD float log(float x) { return logf(x); }
DMLFAST_HD double log(double x) { return ::log(x); }
DMLFAST_HD float log1p(float x) { return log1pf(x); }
DMLFAST_HD double log1p(double x) { return ::log1p(x); }
DMLFAST_HD float sqrt(float x) { return sqrtf(x); }
DMLFAST_HD double sqrt(double x) { return ::sqrt(x); }
// Comparisons, not library calls (fmax is one on the host): the inputs are finite, or the call
// fails its value checks anyway. `finite` is written out so that no compiler flag can drop it.
template <typename T>
DMLFAST_HD T max(T a, T b) { return a > b ? a : b; }
template <typename T>
DMLFAST_HD T min(T a, T b) { return a < b ? a : b; }
template <typename T>
DMLFAST_HD bool finite(T x) { return x - x == T(0); }
}  // namespace math

// v[i] = e^{v[i]} for i < n: on the host the vectorized exp_in_place (csrc/cpu/exp_runs.h), on the
// GPU one exponential per element.
template <typename T>
DMLFAST_HD void exp_run(T* v, int64_t n) {
#ifdef __CUDA_ARCH__
  for (int64_t i = 0; i < n; ++i) v[i] = math::exp(v[i]);
#else
  exp_in_place(v, n);
#endif
}

// Official normalization x / sqrt(sum x^2 + eps) (docs/losses.md §0).
constexpr double kNormEps = 1e-12;
constexpr int kThreadsPerBlock = 128;

DMLFAST_HD int64_t blocks_for(int64_t n, int64_t per_block) { return (n + per_block - 1) / per_block; }

// m = sqrt(n^2 + eps) from the plain Euclidean norm n (ATen's, one coalesced reduction per tile).
template <typename T>
DMLFAST_HD T norm_with_eps(T plain_norm) {
  return math::sqrt(plain_norm * plain_norm + T(kNormEps));
}

// LSE0(u) = log(1 + sum_i e^{u_i}) (docs/losses.md §0) from shift = max(0, max_i u_i) and
// sum = sum_i e^{u_i - shift}; an empty set gives 0. With shift = 0 it is log1p(sum), which keeps
// the digits of the tiny sums that well-separated negatives produce (docs/losses.md §7.6).
template <typename T>
DMLFAST_HD T lse0_from_shifted(T shift, T sum) {
  return shift == T(0) ? math::log1p(sum) : shift + math::log(math::exp(-shift) + sum);
}

// ---------------------------------------------------------------------------------------------
// Value checks. Kernels that meet an input they check clear its flag (flags start at 1). Every
// writer stores the same 0, so the unsynchronized stores are harmless; a null `flags` means the
// checks are off.
enum ValueFlag : int { kLabelsInRange = 0, kEmbeddingsFinite, kProxiesFinite, kUncertaintyFinite, kNumValueFlags };

DMLFAST_HD void clear_flag(int32_t* flags, int which) {
  if (flags != nullptr) flags[which] = 0;
}

// A [rows, cols] matrix addressed with explicit strides, so that each device can lay tiles out as
// its threads walk them best (csrc/tiles.h).
template <typename E>
struct TileView {
  E* data;
  int64_t row_stride;
  int64_t col_stride;
  DMLFAST_HD E& at(int64_t row, int64_t col) const { return data[row * row_stride + col * col_stride]; }
};

// A [rows, cols] matrix stored row by row (the softmax family's tiles on every device): a row is
// a plain array, which the CPU compiler can vectorize along.
template <typename E>
struct RowMajorView {
  E* data;
  int64_t row_stride;
  DMLFAST_HD E& at(int64_t row, int64_t col) const { return data[row * row_stride + col]; }
  DMLFAST_HD E* row(int64_t r) const { return data + r * row_stride; }
};

// Before a loop whose iterations are independent although its arrays may be the same one (a tile
// updated in place, element by element): lets the host compiler vectorize it without a runtime
// overlap check that such loops would fail.
#if defined(__CUDA_ARCH__) || !defined(__GNUC__) || defined(__clang__)
#define DMLFAST_INDEPENDENT_ITERATIONS
#else
#define DMLFAST_INDEPENDENT_ITERATIONS _Pragma("GCC ivdep")
#endif

// The (column, group of rows) a tile thread owns: consecutive threads own consecutive columns
// (coalesced reads of a row-major tile), and the groups split the batch so that a tile of a few
// hundred columns still has thousands of threads.
struct ColumnGroup {
  int64_t column, group, first_row, last_row;
};
DMLFAST_HD bool column_group(int64_t index, int64_t cols, int64_t rows, int64_t rows_per_group,
                             ColumnGroup& out) {
  out.column = index % cols;
  out.group = index / cols;
  out.first_row = out.group * rows_per_group;
  out.last_row = math::min(out.first_row + rows_per_group, rows);
  return out.first_row < rows;
}

// The proxy row that sample b's label selects in this call's proxies, clamped into range so that
// gathers stay in bounds; an out-of-range label fails the label check and its results are never
// returned. `label` is local to the call's proxies (label - class_offset when sharded).
DMLFAST_HD int64_t safe_row(int64_t label, int64_t local_classes) {
  return label < 0 ? 0 : (label >= local_classes ? local_classes - 1 : label);
}

// ---------------------------------------------------------------------------------------------
// Embedding rows, one thread per sample b: n_b = sqrt(||x_b||^2 + eps), x_hat_b = x_b / n_b, the
// copy the GEMMs read (x_hat, or x itself for IDML, in the GEMM dtype), and the checks that belong
// to a sample: its label in [0, num_classes) and a finite norm. The per-sample kernels sum over D
// in double: a thread's sequential float sum loses digits that alpha = 32 in an exponent would
// magnify, and B x D is small.
template <typename In, typename T, typename G>
struct EmbeddingRows {
  const In* x;              // [B, D]
  const int64_t* labels;    // [B], global
  int64_t rows, dim, num_classes;
  T* unit;                  // [B, D] out: x_hat, or null
  G* gemm;                  // [B, D] out: what the GEMMs read, or null
  bool gemm_is_raw;         // gemm gets x (IDML) instead of x_hat
  T* sq_norm;               // [B] out: ||x_b||^2, or null
  T* norm;                  // [B] out: n_b
  int32_t* flags;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    const In* row = x + b * dim;
    double wide_sq = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double v = static_cast<double>(static_cast<T>(row[d]));
      wide_sq += v * v;
    }
    const T sq = static_cast<T>(wide_sq);
    const T n = static_cast<T>(math::sqrt(wide_sq + kNormEps));
    norm[b] = n;
    if (sq_norm != nullptr) sq_norm[b] = sq;
    if (!math::finite(n)) clear_flag(flags, kEmbeddingsFinite);
    if (labels[b] < 0 || labels[b] >= num_classes) clear_flag(flags, kLabelsInRange);
    const T inv = T(1) / n;
    for (int64_t d = 0; d < dim; ++d) {
      const T v = static_cast<T>(row[d]);
      if (unit != nullptr) unit[b * dim + d] = v * inv;
      if (gemm != nullptr) gemm[b * dim + d] = static_cast<G>(gemm_is_raw ? v : v * inv);
    }
  }
};

// Backward of the normalization, one thread per sample b: dL/dx_b = (1/n_b)(g_b - <x_hat_b, g_b> x_hat_b)
// with g = dL/dx_hat (docs/losses.md §7.1), written in the embeddings' dtype.
template <typename T, typename Out>
struct EmbeddingBackward {
  const T* grad_unit;  // [B, D]
  const T* unit;       // [B, D]
  const T* norm;       // [B]
  int64_t rows, dim;
  Out* out;            // [B, D]

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    const T* g = grad_unit + b * dim;
    const T* u = unit + b * dim;
    double wide_dot = 0;
    for (int64_t d = 0; d < dim; ++d) wide_dot += static_cast<double>(g[d]) * static_cast<double>(u[d]);
    const T dot = static_cast<T>(wide_dot);
    const T inv = T(1) / norm[b];
    for (int64_t d = 0; d < dim; ++d) out[b * dim + d] = static_cast<Out>(inv * (g[d] - dot * u[d]));
  }
};

// dL/dp for one tile of proxies, one thread per (row c, chunk of dim_chunk components):
// out = gemm - kappa_c p_c, where gemm = G'^T X_hat (or H^T X for IDML) and kappa as in the header
// comment. S is the GEMMs' dtype: with low-precision GEMMs both the product and p_c are read in it
// (the tile's converted copy), which halves this pass's reads; `gemm` may be `out` when S = T.
// The GPU gives each thread a few neighbouring components (wide, coalesced accesses), the CPU a
// whole row (one index division per row, not per element).
template <typename T, typename S>
struct ProxyGradFinish {
  const S* gemm;      // [cols, D]
  const S* proxies;   // [cols, D]
  const T* kappa;     // [cols]
  int64_t cols, dim, dim_chunk;
  T* out;             // [cols, D]

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t chunks = blocks_for(dim, dim_chunk);
    const int64_t index = block * block_dim + thread;
    const int64_t c = index / chunks;
    if (c >= cols) return;
    const int64_t first = c * dim + (index - c * chunks) * dim_chunk;
    const int64_t last = c * dim + math::min((index - c * chunks + 1) * dim_chunk, dim);
    const T k = kappa[c];
    for (int64_t i = first; i < last; ++i) out[i] = static_cast<T>(gemm[i]) - k * static_cast<T>(proxies[i]);
  }
};

// One thread per proxy column c of a tile: 1 / m_c from the plain norm ||p_c|| (ATen's coalesced
// row reduction) and the check that the proxy is finite.
template <typename T>
struct ColumnScales {
  const T* column_norm;     // [cols] ||p_c||
  int64_t cols;
  T* inv_norm;              // [cols] out: 1 / m_c
  int32_t* flags;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t c = block * block_dim + thread;
    if (c >= cols) return;
    if (!math::finite(column_norm[c])) clear_flag(flags, kProxiesFinite);
    inv_norm[c] = T(1) / norm_with_eps(column_norm[c]);
  }
};

// The autograd backward's scaling by the upstream gradient, skipped on the device when it is
// exactly 1 (loss.backward()), so no host read is needed to skip it. A grid-stride loop over a
// bounded grid: blocks that have nothing to do must not be launched by the million.
template <typename E, typename F>
struct ScaleUnlessOne {
  E* data;
  int64_t elements;
  int64_t stride;     // threads in the grid
  const F* factor;    // one value on the device

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t first = block * block_dim + thread;
    if (first >= stride) return;  // the grid's last block may have more threads than `stride`
    const F f = *factor;
    if (f == F(1)) return;
    for (int64_t i = first; i < elements; i += stride) {
      data[i] = static_cast<E>(static_cast<F>(data[i]) * f);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Anchor family: Proxy-Anchor (docs/losses.md §1.1, §7.2), Proxy-ISA (§3, §7.4), and IDML's
// negatives (§6, §7.5). The B positive pairs are handled sparsely (one similarity per sample);
// the dense tiles handle the negative pairs, whose gradient is 0 at the positive entries.

// M of class c's negatives: easy_negative below the threshold, 1 above it (and without ISA).
template <typename T>
struct NegativeWeights {
  bool isa;
  T threshold, easy_negative;
  DMLFAST_HD T at(T s) const { return (isa && s < threshold) ? easy_negative : T(1); }
};

// Per-class inputs of Proxy-ISA's multipliers M (docs/losses.md §3.3, §7.4), each [C]. With
// `center` null every M is 1: plain Proxy-Anchor. M scales the exponents and takes no gradient.
template <typename T>
struct IsaClassParams {
  const T* center;          // s_bar_c: a positive above it is easy
  const T* threshold;       // theta_c: a positive below it is an outlier, a negative below it easy
  const T* weight;          // w_c: M of easy positives and outliers; 1 + w_c inside [theta, s_bar]
  const T* easy_negative;   // M of easy negatives, 1 / max(1, n_c)
  bool filter_positives;    // the positive bands are on (otherwise positives have M = 1)

  DMLFAST_HD T positive(int64_t c, T s) const {
    if (center == nullptr || !filter_positives) return T(1);
    return (s >= threshold[c] && s <= center[c]) ? T(1) + weight[c] : weight[c];
  }
  DMLFAST_HD NegativeWeights<T> negatives_of(int64_t c) const {
    return center == nullptr ? NegativeWeights<T>{false, T(0), T(1)}
                             : NegativeWeights<T>{true, threshold[c], easy_negative[c]};
  }
};

// Whether sample b is the first of its class in the batch (the one that speaks for the class).
DMLFAST_HD bool first_of_its_class(const int64_t* labels, int64_t b) {
  for (int64_t j = 0; j < b; ++j) {
    if (labels[j] == labels[b]) return false;
  }
  return true;
}

// One thread per sample b: the cosine of its positive pair, s_b = x_hat_b . p_{y_b} / m_{y_b}, and
// m_{y_b}, gathering the proxy row from the raw proxies.
template <typename T>
struct PositivePairs {
  const T* unit;            // [B, D] x_hat
  const T* proxies;         // [C_local, D]
  const int64_t* labels;    // [B], local
  int64_t rows, dim, local_classes;
  T* cosine;                // [B] out
  T* proxy_norm;            // [B] out

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    const T* p = proxies + safe_row(labels[b], local_classes) * dim;
    const T* u = unit + b * dim;
    double sq = 0, dot = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double v = static_cast<double>(p[d]);
      sq += v * v;
      dot += static_cast<double>(u[d]) * v;
    }
    const double m = math::sqrt(sq + kNormEps);
    proxy_norm[b] = static_cast<T>(m);
    cosine[b] = static_cast<T>(dot / m);
  }
};

// One thread per sample b: l+_{y_b} = LSE0({-alpha M_j (s_j - margin) : y_j = y_b}), recomputed
// by every sample of the class in the same order (deterministic, no atomics), the class's mean M,
// and whether b is the class's first sample (the one that counts the class in the normalizer).
template <typename T>
struct AnchorPositive {
  const T* cosine;          // [B]: s_b
  const int64_t* labels;    // [B], local
  int64_t rows;
  T alpha, margin;
  IsaClassParams<T> isa;
  T* class_lse;             // [B] out: l+ of class y_b (the same for all its samples)
  T* is_first;              // [B] out: 1 where b is the first sample of its class, else 0
  T* weight;                // [B] out: M_b of the positive pair (b, y_b)
  T* class_mean_weight;     // [B] out: mean of M over the positives of class y_b

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    const int64_t cls = labels[b];
    T shift = 0, weight_sum = 0;
    int64_t count = 0;
    for (int64_t j = 0; j < rows; ++j) {
      if (labels[j] != cls) continue;
      const T m = isa.positive(cls, cosine[j]);
      shift = math::max(shift, -alpha * m * (cosine[j] - margin));
      weight_sum += m;
      ++count;
    }
    T sum = 0;
    for (int64_t j = 0; j < rows; ++j) {
      if (labels[j] != cls) continue;
      sum += math::exp(-alpha * isa.positive(cls, cosine[j]) * (cosine[j] - margin) - shift);
    }
    class_lse[b] = lse0_from_shifted(shift, sum);
    is_first[b] = first_of_its_class(labels, b) ? T(1) : T(0);
    weight[b] = isa.positive(cls, cosine[b]);
    class_mean_weight[b] = weight_sum / T(count);
  }
};

// One thread per sample b, after AnchorPositive: W+ = sum over classes of their mean M (|P+| when
// M = 1), g_b = dL/ds_b = -(alpha M_b / W+) e^{u_b - l+} with u_b = -alpha M_b (s_b - margin), and
// (thread 0) the positives' loss sum_c l+_c / W+. W+ counts every class of the batch; sharded,
// only the classes of this shard (0 <= local label < local_classes) enter the loss and g.
// Every thread sums W+ itself, in the same order: B^2 additions instead of a reduction launch.
template <typename T>
struct AnchorPositiveFinish {
  const T* cosine;
  const T* class_lse;
  const T* is_first;
  const T* weight;
  const T* class_mean_weight;
  const int64_t* labels;    // [B], local
  int64_t rows, local_classes;
  T alpha, margin;
  T* grad;                  // [B] out: g_b
  T* loss;                  // [1] out: the positives' part of the loss

  DMLFAST_HD bool owned(int64_t b) const { return labels[b] >= 0 && labels[b] < local_classes; }

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    T normalizer = 0;
    for (int64_t j = 0; j < rows; ++j) normalizer += is_first[j] * class_mean_weight[j];
    normalizer = math::max(normalizer, T(1e-30));
    const T exponent = -alpha * weight[b] * (cosine[b] - margin) - class_lse[b];
    grad[b] = owned(b) ? -(alpha * weight[b] / normalizer) * math::exp(exponent) : T(0);
    if (b == 0) {
      T sum = 0;
      for (int64_t j = 0; j < rows; ++j) {
        if (owned(j)) sum += is_first[j] * class_lse[j];
      }
      *loss = sum / normalizer;
    }
  }
};

// One thread per (sample b, chunk of dim_chunk components), after the dense tiles:
// - the positive pair's share of dL/dx_hat_b, g_b p_{y_b} / m_{y_b}, added to grad_unit;
// - the first sample of each class sums, in sample order, its class's positive pairs' share of
//   dL/dp_c = (1/m_c) sum_b g_b (x_hat_b - s_b p_c / m_c) into class_grad row b (each pair's
//   difference first: when the x_hat_b lie close to p_c, that cancels less than subtracting
//   two sums); every other sample writes zeros, so adding all B rows into dP (index_add_) is exact
//   in any order.
template <typename T>
struct PositiveScatter {
  const T* grad;            // [B]: g_b
  const T* cosine;          // [B]: s_b
  const T* proxy_norm;      // [B]: m_{y_b}
  const T* unit;            // [B, D]
  const T* proxies;         // [C_local, D]
  const int64_t* labels;    // [B], local
  int64_t rows, dim, dim_chunk, local_classes;
  T* grad_unit;             // [B, D] in/out
  T* class_grad;            // [B, D] out

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t chunks = blocks_for(dim, dim_chunk);
    const int64_t index = block * block_dim + thread;
    const int64_t b = index / chunks;
    if (b >= rows) return;
    const int64_t first = (index % chunks) * dim_chunk;
    const int64_t last = math::min(first + dim_chunk, dim);
    const T* p = proxies + safe_row(labels[b], local_classes) * dim;
    const T inv_norm = T(1) / proxy_norm[b];
    const T own = grad[b] * inv_norm;
    for (int64_t d = first; d < last; ++d) grad_unit[b * dim + d] += own * p[d];
    T* out = class_grad + b * dim;
    for (int64_t d = first; d < last; ++d) out[d] = 0;
    if (!first_of_its_class(labels, b)) return;
    for (int64_t j = b; j < rows; ++j) {
      if (labels[j] != labels[b]) continue;
      const T g = grad[j], along_proxy = cosine[j] * inv_norm;
      for (int64_t d = first; d < last; ++d) out[d] += g * (unit[j * dim + d] - along_proxy * p[d]);
    }
    for (int64_t d = first; d < last; ++d) out[d] *= inv_norm;
  }
};

// Per (group, column) results of AnchorPartial, each [groups * cols] with slot group * cols + column.
template <typename T>
struct AnchorPartials {
  T* max;        // the group's largest negative exponent v (0 when it has none)
  T* sum;        // sum of e^{v - max} over the group's negatives
  T* weight_sum; // sum of M over them
  T* count;      // how many there are
  T* cos_sum;    // sum of M e^{v - max} cos: kappa's share (docs/losses.md §7.1)
};

// The negatives' exponent v_bc = alpha M_bc (cos_bc + margin) over a tile of S (docs/losses.md §7.2).
template <typename T>
struct AnchorTile {
  TileView<T> sim;          // [B, cols]: S (or, with inv_norm null, the similarity itself: IDML's S')
  const int64_t* labels;    // [B], local
  int64_t rows, cols, rows_per_group, first_class;
  const T* inv_norm;        // [cols] 1 / m_c, or null
  T alpha, margin;
  IsaClassParams<T> isa;
};

// Pass 1 of the dense negatives, one thread per (column c, group of rows): the group's max of v,
// sum of e^{v - max}, its M and cos sums. Each entry of the tile is overwritten with M e^{v - max}
// (0 at the positive entries), so that AnchorApply needs one multiplication per entry and no
// exponential.
template <typename T>
struct AnchorPartial {
  AnchorTile<T> tile;
  AnchorPartials<T> out;

  // Exponentials per run of the contiguous walk: a stack buffer that stays in L1.
  static constexpr int64_t kRun = 64;

  DMLFAST_HD T exponent(const NegativeWeights<T>& weights, T s) const {
    return tile.alpha * weights.at(s) * (s + tile.margin);
  }

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    ColumnGroup cg;
    if (!column_group(block * block_dim + thread, tile.cols, tile.rows, tile.rows_per_group, cg)) return;
#ifdef __CUDA_ARCH__
    strided_rows(cg);  // contiguous_rows' run buffer would cost every GPU thread a stack frame
#else
    if (tile.sim.row_stride == 1) {
      contiguous_rows(cg);
    } else {
      strided_rows(cg);
    }
#endif
  }

  DMLFAST_HD void write(const ColumnGroup& cg, T group_max, T sum, T weight_sum, T count, T cos_sum) const {
    const int64_t slot = cg.group * tile.cols + cg.column;
    out.max[slot] = group_max;
    out.sum[slot] = sum;
    out.weight_sum[slot] = weight_sum;
    out.count[slot] = count;
    out.cos_sum[slot] = cos_sum;
  }

  // Any layout (the GPU's row-major tiles: neighbouring threads, neighbouring columns).
  DMLFAST_HD void strided_rows(const ColumnGroup& cg) const {
    const AnchorTile<T>& t = tile;
    const int64_t c = cg.column, cls = t.first_class + c;
    const T inv_norm = t.inv_norm == nullptr ? T(1) : t.inv_norm[c];
    const NegativeWeights<T> weights = t.isa.negatives_of(cls);
    T group_max = 0;
    bool any = false;
    for (int64_t b = cg.first_row; b < cg.last_row; ++b) {
      if (t.labels[b] == cls) continue;
      const T v = exponent(weights, t.sim.at(b, c) * inv_norm);
      group_max = any ? math::max(group_max, v) : v;
      any = true;
    }
    T sum = 0, weight_sum = 0, count = 0, cos_sum = 0;
    for (int64_t b = cg.first_row; b < cg.last_row; ++b) {
      T& entry = t.sim.at(b, c);
      if (t.labels[b] == cls) {
        entry = 0;
        continue;
      }
      const T s = entry * inv_norm;
      const T m = weights.at(s);
      const T e = math::exp(t.alpha * m * (s + t.margin) - group_max);
      sum += e;
      weight_sum += m;
      count += T(1);
      cos_sum += m * e * s;
      entry = m * e;
    }
    write(cg, group_max, sum, weight_sum, count, cos_sum);
  }

  // The group's rows next to each other (the CPU's column-major tiles): the same sums in loops
  // without branches, four lanes each, and the exponentials apart from them, kRun at a time through
  // exp_run (a call to the library's exp in the middle of the sums spilled them every entry).
  DMLFAST_HD void contiguous_rows(const ColumnGroup& cg) const {
    const AnchorTile<T>& t = tile;
    const int64_t c = cg.column, cls = t.first_class + c;
    const T inv_norm = t.inv_norm == nullptr ? T(1) : t.inv_norm[c];
    const NegativeWeights<T> weights = t.isa.negatives_of(cls);
    T* column = &t.sim.at(cg.first_row, c);
    const int64_t* labels = t.labels + cg.first_row;
    const int64_t n = cg.last_row - cg.first_row;
    const T none = -T(INFINITY);
    T max4[4] = {none, none, none, none};
    int64_t b = 0;
    for (; b + 4 <= n; b += 4) {
      for (int k = 0; k < 4; ++k) {
        const T v = exponent(weights, column[b + k] * inv_norm);
        max4[k] = labels[b + k] != cls ? math::max(max4[k], v) : max4[k];
      }
    }
    for (; b < n; ++b) {
      if (labels[b] != cls) max4[0] = math::max(max4[0], exponent(weights, column[b] * inv_norm));
    }
    const T largest = math::max(math::max(max4[0], max4[1]), math::max(max4[2], max4[3]));
    const T group_max = largest == none ? T(0) : largest;
    T sum4[4] = {0, 0, 0, 0}, weight4[4] = {0, 0, 0, 0}, count4[4] = {0, 0, 0, 0}, cos4[4] = {0, 0, 0, 0};
    T e[kRun];
    for (int64_t run = 0; run < n; run += kRun) {
      const int64_t len = math::min(kRun, n - run);
      for (int64_t i = 0; i < len; ++i) e[i] = exponent(weights, column[run + i] * inv_norm) - group_max;
      exp_run(e, len);
      auto accumulate = [&](int64_t i, int lane) {
        const bool negative = labels[run + i] != cls;
        const T s = column[run + i] * inv_norm;
        const T m = negative ? weights.at(s) : T(0);
        const T exp_v = negative ? e[i] : T(0);
        sum4[lane] += exp_v;
        weight4[lane] += m;
        count4[lane] += negative ? T(1) : T(0);
        cos4[lane] += m * exp_v * s;
        column[run + i] = m * exp_v;
      };
      int64_t i = 0;
      for (; i + 4 <= len; i += 4) {
        accumulate(i, 0);
        accumulate(i + 1, 1);
        accumulate(i + 2, 2);
        accumulate(i + 3, 3);
      }
      for (; i < len; ++i) accumulate(i, 0);
    }
    auto total = [](const T* lanes) { return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]); };
    write(cg, group_max, total(sum4), total(weight4), total(count4), total(cos4));
  }
};

// Pass 2, one thread per column c: the groups merged in a fixed order. With shift = max(0, max v)
// and Z = e^{-shift} + sum e^{v - shift}: the column's loss term l_c = LSE0(v) = shift + log Z,
// its mean negative M, the factor that turns each group's stored M e^{v - group max} into
// G'_bc = neg_scale M e^{v - shift} / (Z m_c), and kappa_c (not for IDML, whose tile holds S').
template <typename T>
struct AnchorMerge {
  AnchorPartials<T> in;
  int64_t groups, cols;
  const T* inv_norm;        // [cols] 1 / m_c, or null: G' = G and no kappa (IDML)
  T neg_scale;              // dL/dl_c: alpha / C (Proxy-Anchor), alpha (ISA: divided by W- at the end)
  T* column_lse;            // [cols] out: l_c
  T* column_mean_weight;    // [cols] out: mean M over the column's negatives (0 if none)
  T* group_scale;           // [groups * cols] out
  T* kappa;                 // [cols] out (with inv_norm)

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t c = block * block_dim + thread;
    if (c >= cols) return;
    T shift = 0, weight_sum = 0, count = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t slot = g * cols + c;
      if (in.count[slot] > T(0)) shift = math::max(shift, in.max[slot]);
      weight_sum += in.weight_sum[slot];
      count += in.count[slot];
    }
    T sum = 0, cos_sum = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t slot = g * cols + c;
      if (in.count[slot] == T(0)) continue;
      const T rescale = math::exp(in.max[slot] - shift);
      sum += in.sum[slot] * rescale;
      cos_sum += in.cos_sum[slot] * rescale;
    }
    column_lse[c] = lse0_from_shifted(shift, sum);
    column_mean_weight[c] = count > T(0) ? weight_sum / count : T(0);
    const T factor = neg_scale / (math::exp(-shift) + sum);
    const T scale = inv_norm == nullptr ? T(1) : inv_norm[c];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t slot = g * cols + c;
      group_scale[slot] = in.count[slot] > T(0) ? factor * math::exp(in.max[slot] - shift) * scale : T(0);
    }
    if (inv_norm != nullptr) kappa[c] = factor * cos_sum * scale * scale;
  }
};

// Pass 3, one thread per (column c, group): G' into `out`, in the dtype the next GEMMs read (the
// positive entries hold 0 since AnchorPartial). `out` may be the tile itself.
template <typename T, typename O>
struct AnchorApply {
  TileView<T> sim;          // [B, cols]: AnchorPartial's M e^{v - group max}
  TileView<O> out;          // [B, cols]
  int64_t rows, cols, rows_per_group;
  const T* group_scale;     // [groups * cols]

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    ColumnGroup cg;
    if (!column_group(block * block_dim + thread, cols, rows, rows_per_group, cg)) return;
    const int64_t c = cg.column;
    const T scale = group_scale[cg.group * cols + c];
    for (int64_t b = cg.first_row; b < cg.last_row; ++b) out.at(b, c) = static_cast<O>(sim.at(b, c) * scale);
  }
};

// One thread: the loss, the positives' part plus the negatives' sum over all columns divided by C
// (or by W-, the sum of the columns' mean M, for Proxy-ISA, also written out for the gradients).
template <typename T>
struct AnchorLoss {
  const T* positive_loss;   // [1]
  const T* column_sums;     // [2]: sum of l_c, sum of mean M
  bool isa;
  T num_classes;
  T* loss;                  // [1] out
  T* neg_normalizer;        // [1] out: the divisor of the negatives' part

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    if (block * block_dim + thread != 0) return;
    const T normalizer = isa ? math::max(column_sums[1], T(1e-30)) : num_classes;
    *neg_normalizer = normalizer;
    *loss = *positive_loss + column_sums[0] / normalizer;
  }
};

// ---------------------------------------------------------------------------------------------
// IDML (docs/losses.md §6, §7.5): Proxy-Anchor on the introspective similarity
//   S'_bc = 1 - (1 - S_bc) g_bc,  g_bc = exp(-(a_b + 4) / (5 d_bc)),
// with S the cosine, d_bc = ||x_b - p_c||^2 of the embedding as given (unit as the model emits
// it) and the raw proxy, and a_b = ||v_b||^2 of the uncertainty embedding. One raw GEMM
// R = X P^T gives both: S = R / (n m) and d = ||x||^2 + ||p||^2 - 2R. The dense pass writes S' into
// a tile, runs the anchor kernels on it, then IdmlChain turns dL/dS' into the coefficients of the
// two backward GEMMs.

// Beyond this exponent g = e^{-(a+4)/(5d)} < 2e-35: g and every derivative are taken as 0, which
// also guards d -> 0 (and d <= 0 from rounding when x is close to p).
constexpr double kIdmlMaxExponent = 80.0;

// g = e^{-(a + 4) / (5 d)}; 0 where d <= 0 or the exponent passes kIdmlMaxExponent.
template <typename T>
DMLFAST_HD T introspective_gate(T dist, T uncertainty) {
  const T exponent = (uncertainty + T(4)) / (T(5) * dist);
  return (dist > T(0) && exponent < T(kIdmlMaxExponent)) ? math::exp(-exponent) : T(0);
}

// S' of one pair and its partial derivatives (docs/losses.md §7.5).
template <typename T>
struct IntrospectivePair {
  T cosine;          // S
  T similarity;      // S'
  T by_cosine;       // dS'/dS = g
  T by_distance;     // dS'/dd = -(1 - S) g (a + 4) / (5 d^2)
  T by_uncertainty;  // dS'/da = (1 - S) g / (5 d)
};

// From the raw dot product x.p, ||x||^2 and 1/n with n = sqrt(||x||^2 + eps), ||p||^2 and 1/m, a,
// and the pair's gate (computed once per pair: the similarity pass keeps it for the chain pass).
// Reciprocals of the norms come in (one division per row or column, not per pair); g > 0 implies
// d > (a + 4) / (5 kIdmlMaxExponent), so 1/d is safe.
template <typename T>
DMLFAST_HD IntrospectivePair<T> introspective_pair(T dot, T x_sq, T inv_x_norm, T p_sq, T inv_p_norm,
                                                   T uncertainty, T gate) {
  IntrospectivePair<T> out;
  out.cosine = dot * inv_x_norm * inv_p_norm;
  const T dissimilarity = T(1) - out.cosine;
  out.by_cosine = gate;
  if (gate > T(0)) {
    const T inv_dist = T(1) / (x_sq + p_sq - T(2) * dot);
    out.by_uncertainty = dissimilarity * gate * T(0.2) * inv_dist;
    out.by_distance = -out.by_uncertainty * (uncertainty + T(4)) * inv_dist;
  } else {
    out.by_uncertainty = out.by_distance = T(0);
  }
  out.similarity = T(1) - dissimilarity * gate;
  return out;
}

// One thread per sample b: the introspective similarity S'_{b, y_b} of its positive pair,
// gathering the proxy row, and the check of its uncertainty.
template <typename T>
struct IdmlPositive {
  const T* x;               // [B, D] as given, in T
  const T* proxies;         // [C_local, D]
  const int64_t* labels;    // [B], local
  int64_t rows, dim, local_classes;
  const T* x_sq;            // [B]
  const T* x_norm;          // [B]
  const T* uncertainty;     // [B]: a_b
  T* similarity;            // [B] out
  int32_t* flags;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    if (!math::finite(uncertainty[b])) clear_flag(flags, kUncertaintyFinite);
    const T* p = proxies + safe_row(labels[b], local_classes) * dim;
    double wide_sq = 0, wide_dot = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double v = static_cast<double>(p[d]);
      wide_sq += v * v;
      wide_dot += static_cast<double>(x[b * dim + d]) * v;
    }
    const T p_sq = static_cast<T>(wide_sq), dot = static_cast<T>(wide_dot);
    const T inv_p_norm = static_cast<T>(1.0 / math::sqrt(wide_sq + kNormEps));
    const T gate = introspective_gate(x_sq[b] + p_sq - T(2) * dot, uncertainty[b]);
    similarity[b] =
        introspective_pair(dot, x_sq[b], T(1) / x_norm[b], p_sq, inv_p_norm, uncertainty[b], gate).similarity;
  }
};

// The inputs of one IDML tile.
template <typename T>
struct IdmlTile {
  TileView<T> dot;          // [B, cols]: R = X P^T; IdmlChain overwrites it with H when O = T
  TileView<T> similarity;   // [B, cols]: S' (IdmlPairs), then G' = dL/dS' (the anchor kernels)
  TileView<T> gate;         // [B, cols]: g (IdmlPairs), read by IdmlChain
  const int64_t* labels;    // [B], local
  int64_t rows, cols, rows_per_group, first_class;
  const T* x_sq;            // [B]
  const T* inv_x_norm;      // [B]: 1 / n
  const T* uncertainty;     // [B]
  const T* column_norm;     // [cols] ||p_c||

  // ||p_c||^2 and 1 / m_c of column c.
  DMLFAST_HD T p_sq(int64_t c) const { return column_norm[c] * column_norm[c]; }
  DMLFAST_HD T inv_p_norm(int64_t c) const { return T(1) / norm_with_eps(column_norm[c]); }
};

// One thread per (column c, group): g_bc and S'_bc for the group's rows.
template <typename T>
struct IdmlPairs {
  IdmlTile<T> tile;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const IdmlTile<T>& t = tile;
    ColumnGroup cg;
    if (!column_group(block * block_dim + thread, t.cols, t.rows, t.rows_per_group, cg)) return;
    const int64_t c = cg.column;
    const T p_sq = t.p_sq(c), inv_p_norm = t.inv_p_norm(c);
    for (int64_t b = cg.first_row; b < cg.last_row; ++b) {
      const T dot = t.dot.at(b, c);
      const T gate = introspective_gate(t.x_sq[b] + p_sq - T(2) * dot, t.uncertainty[b]);
      t.gate.at(b, c) = gate;
      t.similarity.at(b, c) = T(1) - (T(1) - dot * t.inv_x_norm[b] * inv_p_norm) * gate;
    }
  }
};

// One thread per (column c, group). With G_S = G' g, G_d = G' dS'/dd and G_a = G' dS'/da:
//   dL/dx_b = sum_c H_bc p_c + x_b sum_c E_bc,   H = G_S / (n m) - 2 G_d,  E = 2 G_d - G_S S / n^2,
//   dL/dp_c = sum_b H_bc x_b + p_c sum_b (2 G_d - G_S S / m^2),  dL/da_b = sum_c G_a,
// (dS/dx = p/(n m) - S x/n^2, dd/dx = 2(x - p), dd/dp = -2(x - p)). H goes to `out` for the two
// GEMMs H P and H^T X; E and G_a stay per entry for the row sums; the column coefficient's
// per-group sums go to col_partial (negated: ProxyGradFinish subtracts kappa p).
template <typename T, typename O>
struct IdmlChain {
  IdmlTile<T> tile;
  const T* pos_grad;        // [B]: G' of the positive pair (b, y_b)
  TileView<O> out;          // [B, cols] out: H (may be tile.dot's memory when O = T)
  TileView<T> row_coef;     // [B, cols] out: E; may be tile.gate's memory (read before written)
  TileView<T> by_uncert;    // [B, cols] out: G_a
  T* col_partial;           // [groups * cols] out

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const IdmlTile<T>& t = tile;
    ColumnGroup cg;
    if (!column_group(block * block_dim + thread, t.cols, t.rows, t.rows_per_group, cg)) return;
    const int64_t c = cg.column, cls = t.first_class + c;
    const T p_sq = t.p_sq(c), inv_p_norm = t.inv_p_norm(c);
    const T inv_p_sq = inv_p_norm * inv_p_norm;
    T col_sum = 0;
    for (int64_t b = cg.first_row; b < cg.last_row; ++b) {
      const T grad = t.labels[b] == cls ? pos_grad[b] : t.similarity.at(b, c);
      const T inv_x_norm = t.inv_x_norm[b];
      const IntrospectivePair<T> pair = introspective_pair(t.dot.at(b, c), t.x_sq[b], inv_x_norm, p_sq, inv_p_norm,
                                                           t.uncertainty[b], t.gate.at(b, c));
      const T grad_cos = grad * pair.by_cosine;
      const T grad_dist2 = T(2) * grad * pair.by_distance;
      out.at(b, c) = static_cast<O>(grad_cos * inv_x_norm * inv_p_norm - grad_dist2);
      row_coef.at(b, c) = grad_dist2 - grad_cos * pair.cosine * inv_x_norm * inv_x_norm;
      by_uncert.at(b, c) = grad * pair.by_uncertainty;
      col_sum += grad_dist2 - grad_cos * pair.cosine * inv_p_sq;
    }
    col_partial[cg.group * t.cols + c] = -col_sum;
  }
};

// One thread per column c: kappa_c = sum over groups of partial[g, c], times 1 / m_c^2 when
// inv_norm is given (the softmax family's cos sums), as it is otherwise (IDML).
template <typename T>
struct ColumnSum {
  const T* partial;         // [groups * cols]
  int64_t groups, cols;
  const T* inv_norm;        // [cols] 1 / m_c, or null
  T* kappa;                 // [cols] out

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t c = block * block_dim + thread;
    if (c >= cols) return;
    T sum = 0;
    for (int64_t g = 0; g < groups; ++g) sum += partial[g * cols + c];
    kappa[c] = inv_norm == nullptr ? sum : sum * inv_norm[c] * inv_norm[c];
  }
};

// ---------------------------------------------------------------------------------------------
// Softmax family (ProxyNCA, ProxyNCA++, Norm-SoftMax; docs/losses.md §2 and §7.3): logits
// z = scale * cos. Pass 1 walks the class tiles and keeps, per row, a running log-sum-exp over the
// classes of the denominator, the sum of all logits (label smoothing needs it) and the target
// logit. Each tile row is cut into slices, one thread per (row, slice), then the slices' partial
// results are merged in a fixed-order tree (SoftmaxMerge, fan-in at a time) and folded into the
// running state (SoftmaxRowUpdate). Pass 2 turns each tile into G' (SoftmaxGrad).

// Row sums run over up to millions of classes, so the running state is kept in double whatever T
// is: a float sum over 10^5 terms would lose ~1e-5 of the loss.
struct SoftmaxRowState {
  double* lse_max;       // [B] running log-sum-exp over the denominator's classes: max ...
  double* lse_sum;       // [B] ... and sum of e^{z - max} (0 while no logit entered)
  double* logit_sum;     // [B] sum over all classes of z_bc; null when not needed (no smoothing)
  double* target_logit;  // [B] z_{b, y_b} (0 where the target is not among these proxies)
};

// Partial results of a run of columns of one row: the largest denominator logit, the sum of
// e^{z - max} over the run's denominator logits (0 if it has none) and the sum of all its logits.
template <typename T>
struct SoftmaxPartials {
  T* max;
  double* sum;
  double* logit_sum;
};

// Merges partial `slot` of `in` into (max, sum, logit_sum); the exponential is in T, the sums in double.
template <typename T>
DMLFAST_HD void merge_softmax_partial(const SoftmaxPartials<T>& in, int64_t slot, T& max,
                                      double& sum, double& logit_sum) {
  logit_sum += in.logit_sum[slot];
  const double part = in.sum[slot];
  if (part == 0) return;  // no denominator logit in that run (only the excluded target)
  const T part_max = in.max[slot];
  if (sum == 0) {
    max = part_max;
    sum = part;
  } else if (part_max > max) {
    sum = sum * static_cast<double>(math::exp(max - part_max)) + part;
    max = part_max;
  } else {
    sum += part * static_cast<double>(math::exp(part_max - max));
  }
}

// How a class's logit comes from the cosines of its K centers (K adjacent proxy rows) and the
// label: z_bc = scale * s_bc for the other classes and scale * f(s_by) for the target, where s is
// the class similarity (docs/losses.md §2 with K = 1 and no margin: ProxyNCA, Norm-SoftMax; §9:
// CosFace, ArcFace, Sub-center ArcFace; §10: SoftTriple).
enum CenterAggregation : int { kMaxCenter = 0, kSoftCenters = 1 };
enum MarginType : int { kNoMargin = 0, kCosFaceMargin = 1, kArcFaceMargin = 2 };

// Below this, 1 - s^2 is taken as it: ArcFace's slope (cos m + s sin m / sqrt(1 - s^2)) stays finite
// when an embedding lies on its target centre.
constexpr double kArcFaceMinSine2 = 1e-12;

template <typename T>
struct ClassLogit {
  int64_t centers;          // K
  int aggregation;          // CenterAggregation: the max (Sub-center ArcFace) or a softmax-weighted mean
  T center_gamma;           // kSoftCenters: the weights are softmax_k(center_gamma * cos_k) (SoftTriple's 1/gamma)
  int margin_type;          // MarginType
  T margin;                 // m (radians for ArcFace)
  T cos_margin, sin_margin; // cos m, sin m
  T arc_threshold;          // cos(pi - m): at or below it ArcFace's f is s - m sin m (InsightFace's), which keeps
                            // f decreasing in the angle

  // f(s) of the target class.
  DMLFAST_HD T target(T s) const {
    if (margin_type == kCosFaceMargin) return s - margin;
    if (margin_type != kArcFaceMargin) return s;
    if (s <= arc_threshold) return s - margin * sin_margin;
    return s * cos_margin - math::sqrt(math::max(T(1) - s * s, T(kArcFaceMinSine2))) * sin_margin;
  }
  // f'(s).
  DMLFAST_HD T target_slope(T s) const {
    if (margin_type != kArcFaceMargin || s <= arc_threshold) return T(1);
    return cos_margin + s * sin_margin / math::sqrt(math::max(T(1) - s * s, T(kArcFaceMinSine2)));
  }
};

// A class's similarity s from its centers' cosines, and what its slope ds/dcos_k needs.
template <typename T>
struct ClassSimilarity {
  T similarity;             // s
  T max;                    // the largest cosine
  T weight_sum;             // kSoftCenters: sum_k e^{gamma (cos_k - max)}
  int64_t argmax;           // the first center with the largest cosine
};

// The largest of v[from, to) and `init`, in four independent lanes (a pipelined loop).
template <typename T>
DMLFAST_HD T max_over(const T* v, int64_t from, int64_t to, T init) {
  T lane0 = init, lane1 = init, lane2 = init, lane3 = init;
  int64_t c = from;
  for (; c + 4 <= to; c += 4) {
    lane0 = math::max(lane0, v[c]);
    lane1 = math::max(lane1, v[c + 1]);
    lane2 = math::max(lane2, v[c + 2]);
    lane3 = math::max(lane3, v[c + 3]);
  }
  for (; c < to; ++c) lane0 = math::max(lane0, v[c]);
  return math::max(math::max(lane0, lane1), math::max(lane2, lane3));
}

template <typename T>
struct SoftmaxTile {
  RowMajorView<T> sim;      // [B, cols]: S; cols = K * the tile's classes
  const int64_t* labels;    // [B], local classes
  int64_t rows, cols, first_class;
  const T* inv_norm;        // [cols] 1 / m_c
  T scale;
  bool exclude_positive;    // the paper's classic form: the target is not in the denominator
  ClassLogit<T> classes;

  DMLFAST_HD int64_t classes_in_tile() const { return cols / classes.centers; }
  DMLFAST_HD T cosine(int64_t b, int64_t c) const { return sim.at(b, c) * inv_norm[c]; }

  // Class j of the tile (columns j K .. j K + K - 1) for row b.
  DMLFAST_HD ClassSimilarity<T> similarity(int64_t b, int64_t j) const {
    const int64_t first = j * classes.centers;
    ClassSimilarity<T> out{cosine(b, first), cosine(b, first), T(1), 0};
    for (int64_t k = 1; k < classes.centers; ++k) {
      // Arithmetic, not a branch: which center is largest is a coin toss the CPU mispredicts (the
      // compiler turned selects written as ?: back into a jump).
      const T c = cosine(b, first + k);
      const int64_t larger = c > out.max ? 1 : 0;
      out.argmax += (k - out.argmax) * larger;
      out.max = math::max(out.max, c);
    }
    out.similarity = out.max;
    if (classes.aggregation == kSoftCenters && classes.centers > 1) {
      T sum = 0, weighted = 0;
      for (int64_t k = 0; k < classes.centers; ++k) {
        const T c = cosine(b, first + k);
        const T e = math::exp(classes.center_gamma * (c - out.max));
        sum += e;
        weighted += e * c;
      }
      out.weight_sum = sum;
      out.similarity = weighted / sum;
    }
    return out;
  }

  // ds/dcos_k of a center with cosine c under the softmax-weighted mean: w_k (1 + gamma (cos_k - s))
  // (docs/losses.md §10). (With one center ds/dcos = 1; under the max it is 1 at the argmax, 0
  // elsewhere: SoftmaxGradTile writes those directly.)
  DMLFAST_HD T soft_center_slope(const ClassSimilarity<T>& s, T c) const {
    const T weight = math::exp(classes.center_gamma * (c - s.max)) / s.weight_sum;
    return weight * (T(1) + classes.center_gamma * (c - s.similarity));
  }

  // Centers per soft_center_run: its buffers stay in L1.
  static constexpr int64_t kSoftRun = 512;

  // The host's softmax-weighted mean (kSoftCenters, K <= kSoftRun) over row b's classes [from, to),
  // (to - from) K <= kSoftRun: each center's e^{gamma (cos_k - max)} into `weights` (K per class, in
  // order), each class's s into `similarity` and 1 / sum_k e^{gamma (cos_k - max)} into
  // `inv_weight_sum`. similarity()'s arithmetic with the exponentials in one exp_run; both passes
  // call this, so they round alike.
  DMLFAST_HD void soft_center_run(int64_t b, int64_t from, int64_t to, T* weights, T* similarity,
                                  T* inv_weight_sum) const {
    const int64_t K = classes.centers, n = (to - from) * K;
    const T* s_row = sim.row(b) + from * K;
    const T* inv = inv_norm + from * K;
    for (int64_t i = 0; i < n; ++i) weights[i] = s_row[i] * inv[i];
    for (int64_t j = 0; j < to - from; ++j) {
      T* w = weights + j * K;
      const T largest = max_over(w, 1, K, w[0]);
      for (int64_t k = 0; k < K; ++k) w[k] = classes.center_gamma * (w[k] - largest);
    }
    exp_run(weights, n);
    for (int64_t j = 0; j < to - from; ++j) {
      T sum = 0, weighted = 0;
      for (int64_t i = j * K; i < (j + 1) * K; ++i) {
        sum += weights[i];
        weighted += weights[i] * (s_row[i] * inv[i]);
      }
      similarity[j] = weighted / sum;
      inv_weight_sum[j] = T(1) / sum;
    }
  }

  // Whether the host computes the class similarities by soft_center_run.
  DMLFAST_HD bool soft_center_runs() const {
    return classes.aggregation == kSoftCenters && classes.centers > 1 && classes.centers <= kSoftRun;
  }

  // The class similarity alone: the cosine itself with one center per class (the common case,
  // without the struct), else similarity(b, j).similarity. Both passes use it, so they round alike.
  DMLFAST_HD T class_similarity(int64_t b, int64_t j) const {
    return classes.centers == 1 ? cosine(b, j) : similarity(b, j).similarity;
  }

  // z of a class from its similarity s: scale * f(s) at the target, scale * s elsewhere.
  DMLFAST_HD T logit(bool target, T s) const { return scale * (target ? classes.target(s) : s); }
  DMLFAST_HD bool is_target(int64_t b, int64_t j) const { return labels[b] - first_class == j; }
};

// sum of v[0, n) in double, in four interleaved lanes added in a fixed order.
template <typename T>
DMLFAST_HD double sum_over(const T* v, int64_t n) {
  double lane0 = 0, lane1 = 0, lane2 = 0, lane3 = 0;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    lane0 += v[c];
    lane1 += v[c + 1];
    lane2 += v[c + 2];
    lane3 += v[c + 3];
  }
  for (; c < n; ++c) lane0 += v[c];
  return (lane0 + lane1) + (lane2 + lane3);
}

// Pass 1, one thread per (row b, slice j) with index b * slices + j: the slice holds the tile's
// classes j, j + slices, j + 2 slices, ... (neighbouring threads read neighbouring columns; with one
// slice a row is walked in order). Writes the slice's partials and, where the row's target is
// among its classes, the target logit. With `exps`, it also leaves e^{z_bj - shift} of each class
// there ([B, classes of the tile]; 0 for an excluded target) and the slice's shift, its largest
// denominator logit, in `shifts` [B * slices]: pass 2 then needs no exponential per element.
template <typename T>
struct SoftmaxSlices {
  SoftmaxTile<T> tile;
  int64_t slices;
  bool logit_sums;          // whether the partials' logit sums are needed (label smoothing, shards)
  SoftmaxPartials<T> out;   // [B * slices]
  double* target_logit;     // [B]
  T* exps;                  // [B, classes of the tile] out, or null
  T* shifts;                // [B * slices] out, with exps

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t index = block * block_dim + thread;
    const int64_t b = index / slices, j = index % slices;
    if (b >= t.rows) return;
    const int64_t target = t.labels[b] - t.first_class;
    if (exps != nullptr && slices == 1) {
      whole_row(index, b, target);
      return;
    }
    const int64_t classes = t.classes_in_tile();
    bool any = false;
    T max = 0;
    double logit_sum = 0;
    double sum = 0;
    if (exps != nullptr) {
      // Two walks: the logits and their max, then each e^{z - max} in place.
      T* row = exps + b * classes;
      for (int64_t c = j; c < classes; c += slices) {
        const T z = t.logit(c == target, t.class_similarity(b, c));
        if (logit_sums) logit_sum += z;
        row[c] = z;
        if (c == target) {
          target_logit[b] = z;
          if (t.exclude_positive) continue;
        }
        max = any ? math::max(max, z) : z;
        any = true;
      }
      for (int64_t c = j; c < classes; c += slices) {
        const T e = (c == target && t.exclude_positive) ? T(0) : math::exp(row[c] - max);
        row[c] = e;
        sum += e;
      }
      shifts[index] = max;
    } else {
      // One walk with an online max: the sum is rescaled when the max grows (one exponential per
      // class either way).
      for (int64_t c = j; c < classes; c += slices) {
        const T z = t.logit(c == target, t.class_similarity(b, c));
        if (logit_sums) logit_sum += z;
        if (c == target) {
          target_logit[b] = z;
          if (t.exclude_positive) continue;
        }
        if (!any) {
          max = z;
          sum = 1;
          any = true;
        } else if (z > max) {
          sum = sum * static_cast<double>(math::exp(max - z)) + 1;
          max = z;
        } else {
          sum += math::exp(z - max);
        }
      }
    }
    out.max[index] = max;
    out.sum[index] = any ? sum : 0.0;
    out.logit_sum[index] = logit_sum;
  }

  // One slice per row with kept exponentials (the CPU's plan): the row's class logits, then the
  // exponentials of them all in one run.
  DMLFAST_HD void whole_row(int64_t index, int64_t b, int64_t target) const {
    const SoftmaxTile<T>& t = tile;
    if (t.classes.centers == 1) {
      one_center_row(index, b, target);
      return;
    }
#ifndef __CUDA_ARCH__
    if (t.soft_center_runs()) {
      soft_center_row(index, b, target);  // its run buffers would cost every GPU thread a stack frame
      return;
    }
#endif
    const int64_t classes = t.classes_in_tile();
    T* row = exps + b * classes;
    for (int64_t c = 0; c < classes; ++c) row[c] = t.logit(c == target, t.class_similarity(b, c));
    exponentials_of_logits(index, b, target, row, classes);
  }

  // One center per class and one slice per row (the CPU): the same two walks as loops without
  // branches, the row's target (`target`, if in this tile) handled on its own.
  DMLFAST_HD void one_center_row(int64_t index, int64_t b, int64_t target) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t classes = t.cols;
    const T* sim = t.sim.row(b);
    T* row = exps + b * classes;  // may be the tile itself (unkept tiles): read each element first
    const bool has_target = target >= 0 && target < classes;
    const T target_z = has_target ? t.logit(true, t.cosine(b, target)) : T(0);
    DMLFAST_INDEPENDENT_ITERATIONS
    for (int64_t c = 0; c < classes; ++c) row[c] = t.logit(false, sim[c] * t.inv_norm[c]);
    if (has_target) row[target] = target_z;
    exponentials_of_logits(index, b, target, row, classes);
  }

  // Softmax-weighted centers and one slice per row (the host): each run of classes' similarities
  // from soft_center_run, then the one-center row's walks over the class logits.
  DMLFAST_HD void soft_center_row(int64_t index, int64_t b, int64_t target) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t classes = t.classes_in_tile(), per_run = SoftmaxTile<T>::kSoftRun / t.classes.centers;
    T* row = exps + b * classes;
    T weights[SoftmaxTile<T>::kSoftRun], similarity[SoftmaxTile<T>::kSoftRun / 2],
        inv_weight_sum[SoftmaxTile<T>::kSoftRun / 2];
    for (int64_t from = 0; from < classes; from += per_run) {
      const int64_t to = math::min(from + per_run, classes);
      t.soft_center_run(b, from, to, weights, similarity, inv_weight_sum);
      for (int64_t j = from; j < to; ++j) row[j] = t.logit(j == target, similarity[j - from]);
    }
    exponentials_of_logits(index, b, target, row, classes);
  }

  // Row b's class logits in `row` become e^{z - shift} (0 for an excluded target), with the row's
  // target logit, partials and shift written out.
  DMLFAST_HD void exponentials_of_logits(int64_t index, int64_t b, int64_t target, T* row, int64_t classes) const {
    const SoftmaxTile<T>& t = tile;
    const bool has_target = target >= 0 && target < classes;
    const bool excluded = has_target && t.exclude_positive;
    if (has_target) target_logit[b] = row[target];
    const double logit_sum = logit_sums ? sum_over(row, classes) : 0.0;
    const bool any = classes > (excluded ? 1 : 0);
    const int64_t first = excluded && target == 0 ? 1 : 0;
    T max = any ? row[first] : T(0);
    if (excluded) {
      max = max_over(row, target + 1, classes, max_over(row, first, target, max));
    } else {
      max = max_over(row, first, classes, max);
    }
    DMLFAST_INDEPENDENT_ITERATIONS
    for (int64_t c = 0; c < classes; ++c) row[c] -= max;
    exp_run(row, classes);
    if (excluded) row[target] = 0;
    shifts[index] = max;
    out.max[index] = max;
    out.sum[index] = any ? sum_over(row, classes) : 0.0;
    out.logit_sum[index] = logit_sum;
  }
};

// Pass 2 with kept exponentials, one thread per (row b, slice j) of a tile: the slice's shift
// becomes e^{shift - lse_b}, the factor that turns its kept e^{z - shift} into p = e^{z - lse_b}.
template <typename T>
struct SoftmaxExpScales {
  T* shifts;                // [B * slices] in: pass 1's shifts; out: the factors
  int64_t rows, slices;
  const T* row_lse;         // [B]

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t index = block * block_dim + thread;
    if (index >= rows * slices) return;
    shifts[index] = math::exp(shifts[index] - row_lse[index / slices]);
  }
};

// One level of the merge tree, one thread per (row b, k): partials k * fan_in .. of row b's
// `in_count` into partial k of its `blocks_for(in_count, fan_in)`.
template <typename T>
struct SoftmaxMerge {
  SoftmaxPartials<T> in;    // [B * in_count]
  int64_t rows, in_count, fan_in;
  SoftmaxPartials<T> out;   // [B * out_count]

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t out_count = blocks_for(in_count, fan_in);
    const int64_t index = block * block_dim + thread;
    const int64_t b = index / out_count, k = index % out_count;
    if (b >= rows) return;
    T max = 0;
    double sum = 0, logit_sum = 0;
    const int64_t last = math::min((k + 1) * fan_in, in_count);
    for (int64_t i = k * fan_in; i < last; ++i) merge_softmax_partial(in, b * in_count + i, max, sum, logit_sum);
    out.max[index] = max;
    out.sum[index] = sum;
    out.logit_sum[index] = logit_sum;
  }
};

// One thread per row b: the row's `count` partials folded into its running state, in order.
template <typename T>
struct SoftmaxRowUpdate {
  SoftmaxPartials<T> in;    // [B * count]
  int64_t rows, count;
  SoftmaxRowState state;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    T max = 0;
    double sum = 0, logit_sum = 0;
    for (int64_t i = 0; i < count; ++i) merge_softmax_partial(in, b * count + i, max, sum, logit_sum);
    if (state.logit_sum != nullptr) state.logit_sum[b] += logit_sum;
    if (sum == 0) return;
    double& row_max = state.lse_max[b];
    double& row_sum = state.lse_sum[b];
    if (row_sum == 0) {
      row_max = max;
      row_sum = sum;
    } else {
      const double new_max = math::max(row_max, static_cast<double>(max));
      row_sum = row_sum * math::exp(row_max - new_max) + sum * math::exp(static_cast<double>(max) - new_max);
      row_max = new_max;
    }
  }
};

// One thread per row b, from complete row statistics: lse_b = max + log(sum), and (thread 0) the
// loss (1/B) sum_b [lse_b - (1 - eps) z_{b,y_b} - eps/(C-1) (sum_c z_bc - z_{b,y_b})]
// (docs/losses.md §7.3), summed in row order.
template <typename T>
struct SoftmaxLoss {
  const double* lse_max;
  const double* lse_sum;
  const double* logit_sum;  // null when smoothing is 0
  const double* target_logit;
  int64_t rows;
  double target_weight;     // 1 - eps
  double other_weight;      // eps / (C - 1)
  T* row_lse;               // [B] out
  T* loss;                  // [1] out

  DMLFAST_HD double row_term(int64_t b) const {
    const double lse = lse_max[b] + math::log(lse_sum[b]);
    const double others = logit_sum == nullptr ? 0.0 : logit_sum[b] - target_logit[b];
    return lse - target_weight * target_logit[b] - other_weight * others;
  }

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const int64_t b = block * block_dim + thread;
    if (b >= rows) return;
    row_lse[b] = static_cast<T>(lse_max[b] + math::log(lse_sum[b]));
    if (b == 0) {
      double sum = 0;
      for (int64_t j = 0; j < rows; ++j) sum += row_term(j);
      *loss = static_cast<T>(sum / static_cast<double>(rows));
    }
  }
};

// Pass 2 of a tile: with dL/ds' = (scale/B)(p_bj - T_bj) for s' = f(s) at the target and s
// elsewhere, p_bj = e^{z_bj - lse_b} (0 for a target excluded from the denominator) and T the
// smoothed targets, each of the class's K centers c gets G_bc = dL/ds' f'(s) ds/dcos_c; G' = G / m_c
// goes into `out` (which may be the tile: each element is read before it is written), and each
// group of rows' sums of G cos for kappa (ColumnSum) into cos_partial, summed in row order. The
// class similarity is computed once per row and class, whatever K. Two kernels share this:
// SoftmaxGrad (the GPU's plan) and SoftmaxGradRuns (the CPU's).
template <typename T, typename O>
struct SoftmaxGradTile {
  SoftmaxTile<T> tile;
  int64_t rows_per_group;
  const T* row_lse;         // [B]
  T target_weight;          // T_{b,y_b}: 1 - smoothing
  T other_weight;           // T_{b,c != y_b}: smoothing / (C - 1)
  T grad_scale;             // scale / B
  RowMajorView<O> out;      // [B, cols]
  T* cos_partial;           // [groups * cols] out
  const T* exps;            // pass 1's kept e^{z - shift} ([B, classes of the tile]), or null: recomputed
  const T* exp_scales;      // [B * slices] e^{shift - lse_b} of the row's slice (SoftmaxExpScales)
  int64_t slices;           // pass 1's slices of this tile

  // Classes per run of the host's walks (their buffers stay in L1).
  static constexpr int64_t kRun = 64;

  // p_bj = e^{z_bj - lse_b}, 0 for a target excluded from the denominator.
  DMLFAST_HD T probability(int64_t b, int64_t j, bool is_target, T similarity) const {
    if (exps != nullptr) {
      const int64_t slice = slices == 1 ? 0 : j % slices;  // the CPU's one slice: no division per class
      return exps[b * tile.classes_in_tile() + j] * exp_scales[b * slices + slice];
    }
    return recomputed_probability(b, is_target, similarity);
  }

  // p_bj from the logit, recomputed exactly as pass 1 rounded it: with one class, p is then exactly 1.
  DMLFAST_HD T recomputed_probability(int64_t b, bool is_target, T similarity) const {
    const SoftmaxTile<T>& t = tile;
    return (is_target && t.exclude_positive) ? T(0) : math::exp(t.logit(is_target, similarity) - row_lse[b]);
  }

  // dL/ds of a class with probability `prob` and similarity s: (scale/B)(p - T) f'(s).
  DMLFAST_HD T class_grad(T prob, bool is_target, T similarity) const {
    const T grad = grad_scale * (prob - (is_target ? target_weight : other_weight));
    return is_target ? grad * tile.classes.target_slope(similarity) : grad;
  }

  // One center per class: G of class j for row b into the tile; returns G cos.
  DMLFAST_HD T one_center(int64_t b, int64_t j, bool is_target) const {
    const T cosine = tile.cosine(b, j);
    const T grad = class_grad(probability(b, j, is_target, cosine), is_target, cosine);
    out.at(b, j) = static_cast<O>(grad * tile.inv_norm[j]);
    return grad * cosine;
  }

  // K centers per class: G of class j's centers for row b into the tile, G cos into partial[k].
  DMLFAST_HD void centers_of(int64_t b, int64_t j, T* partial) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t first = j * t.classes.centers;
    const ClassSimilarity<T> s = t.similarity(b, j);
    const bool is_target = t.is_target(b, j);
    const T grad = class_grad(probability(b, j, is_target, s.similarity), is_target, s.similarity);
    if (t.classes.aggregation != kSoftCenters) {
      // The max: only the largest center has a gradient. Zeros, then that one entry, with no
      // branch on which center it is (a coin toss the CPU mispredicts).
      // s.max is that center's cosine: `out` may be the tile, already zeroed.
      for (int64_t k = 0; k < t.classes.centers; ++k) out.at(b, first + k) = static_cast<O>(T(0));
      const int64_t c = first + s.argmax;
      partial[s.argmax] += grad * s.max;
      out.at(b, c) = static_cast<O>(grad * t.inv_norm[c]);
      return;
    }
    for (int64_t k = 0; k < t.classes.centers; ++k) {
      const T cosine = t.cosine(b, first + k);
      const T g = grad * t.soft_center_slope(s, cosine);
      partial[k] += g * cosine;
      out.at(b, first + k) = static_cast<O>(g * t.inv_norm[first + k]);
    }
  }

  // p of row b's classes [run, run + n) from their similarities into `prob`: from the kept
  // exponentials, or recomputed through one exp_run.
  DMLFAST_HD void run_probabilities(int64_t b, int64_t run, int64_t n, const T* similarity, T* prob) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t target = t.labels[b] - t.first_class;
    if (exps != nullptr) {
      for (int64_t j = 0; j < n; ++j) prob[j] = probability(b, run + j, run + j == target, similarity[j]);
      return;
    }
    for (int64_t j = 0; j < n; ++j) prob[j] = t.logit(run + j == target, similarity[j]) - row_lse[b];
    exp_run(prob, n);
    if (t.exclude_positive && target >= run && target < run + n) prob[target - run] = 0;
  }

  // The max over centers (Sub-center ArcFace) on the host: row b's classes [from, to), kRun at a
  // time, their probabilities through run_probabilities; G is dL/ds at each class's first largest
  // center, 0 at the others.
  DMLFAST_HD void max_centers(int64_t b, int64_t from, int64_t to, T* partial) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t K = t.classes.centers;
    const int64_t target = t.labels[b] - t.first_class;
    O* grads = out.row(b);
    T similarity[kRun], grad[kRun];
    int64_t argmax[kRun];
    for (int64_t run = from; run < to; run += kRun) {
      const int64_t n = math::min(kRun, to - run);
      // Every center's cosine is read here, before `out` (which may be the tile) is written.
      for (int64_t j = 0; j < n; ++j) {
        const ClassSimilarity<T> s = t.similarity(b, run + j);
        similarity[j] = s.max;
        argmax[j] = s.argmax;
      }
      run_probabilities(b, run, n, similarity, grad);
      for (int64_t j = 0; j < n; ++j) grad[j] = class_grad(grad[j], run + j == target, similarity[j]);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t first = (run + j) * K;
        for (int64_t k = 0; k < K; ++k) grads[first + k] = static_cast<O>(T(0));
        const int64_t c = first + argmax[j];
        partial[c] += grad[j] * similarity[j];
        grads[c] = static_cast<O>(grad[j] * t.inv_norm[c]);
      }
    }
  }

  // Softmax-weighted centers on the host (soft_center_runs): row b's classes [from, to), one
  // soft_center_run at a time, G as centers_of's with w_k = e_k (1 / sum) and, where pass 1 kept no
  // exponentials, the run's probabilities through one exp_run.
  DMLFAST_HD void soft_centers(int64_t b, int64_t from, int64_t to, T* partial) const {
    const SoftmaxTile<T>& t = tile;
    const int64_t K = t.classes.centers, per_run = SoftmaxTile<T>::kSoftRun / K;
    const int64_t target = t.labels[b] - t.first_class;
    const T gamma = t.classes.center_gamma;
    const T* sim = t.sim.row(b);
    O* grads = out.row(b);
    T weights[SoftmaxTile<T>::kSoftRun], similarity[SoftmaxTile<T>::kSoftRun / 2],
        inv_weight_sum[SoftmaxTile<T>::kSoftRun / 2], coef[SoftmaxTile<T>::kSoftRun / 2];
    for (int64_t run = from; run < to; run += per_run) {
      const int64_t n = math::min(per_run, to - run);
      t.soft_center_run(b, run, run + n, weights, similarity, inv_weight_sum);
      run_probabilities(b, run, n, similarity, coef);
      // coef becomes dL/ds / sum_k e_k, each class's factor of its centers' G.
      for (int64_t j = 0; j < n; ++j) coef[j] = class_grad(coef[j], run + j == target, similarity[j]) * inv_weight_sum[j];
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t c = (run + j) * K + k;
          const T cosine = sim[c] * t.inv_norm[c];
          const T g = coef[j] * weights[j * K + k] * (T(1) + gamma * (cosine - similarity[j]));
          partial[c] += g * cosine;
          grads[c] = static_cast<O>(g * t.inv_norm[c]);
        }
      }
    }
  }

  // One center per class, row b's classes [from, to), none of them its target: loops without
  // branches, p either recomputed (kRun exponentials at a time through exp_run) or, from kept
  // exponentials with one slice per row, e^{z - shift} e^{shift - lse} with one factor per row.
  DMLFAST_HD void others(int64_t b, int64_t from, int64_t to, T* partial) const {
    const SoftmaxTile<T>& t = tile;
    if (exps != nullptr && slices != 1) {
      for (int64_t j = from; j < to; ++j) partial[j] += one_center(b, j, false);
      return;
    }
    const T* sim = t.sim.row(b);
    O* grads = out.row(b);
    if (exps == nullptr) {
      T p[kRun];
      for (int64_t run = from; run < to; run += kRun) {
        const int64_t n = math::min(kRun, to - run);
        for (int64_t i = 0; i < n; ++i) p[i] = t.logit(false, sim[run + i] * t.inv_norm[run + i]) - row_lse[b];
        exp_run(p, n);
        DMLFAST_INDEPENDENT_ITERATIONS
        for (int64_t i = 0; i < n; ++i) {
          const int64_t j = run + i;
          const T cosine = sim[j] * t.inv_norm[j];
          const T grad = class_grad(p[i], false, cosine);
          partial[j] += grad * cosine;
          grads[j] = static_cast<O>(grad * t.inv_norm[j]);
        }
      }
      return;
    }
    const T factor = exp_scales[b];
    const T* kept = exps + b * t.classes_in_tile();
    DMLFAST_INDEPENDENT_ITERATIONS
    for (int64_t j = from; j < to; ++j) {
      const T cosine = sim[j] * t.inv_norm[j];
      const T grad = class_grad(kept[j] * factor, false, cosine);
      partial[j] += grad * cosine;
      grads[j] = static_cast<O>(grad * t.inv_norm[j]);
    }
  }
};

// Pass 2, one thread per (class j of the tile, group of rows), the GPU's plan: neighbouring threads
// own neighbouring columns; a one-center class keeps its sum of G cos in a register.
template <typename T, typename O>
struct SoftmaxGrad {
  SoftmaxGradTile<T, O> g;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const SoftmaxTile<T>& t = g.tile;
    const int64_t centers = t.classes.centers;
    ColumnGroup cg;
    if (!column_group(block * block_dim + thread, t.classes_in_tile(), t.rows, g.rows_per_group, cg)) return;
    const int64_t j = cg.column;
    T* partial = g.cos_partial + cg.group * t.cols + j * centers;
    if (centers == 1) {
      T cos_sum = 0;
      for (int64_t b = cg.first_row; b < cg.last_row; ++b) cos_sum += g.one_center(b, j, t.is_target(b, j));
      *partial = cos_sum;
      return;
    }
    for (int64_t k = 0; k < centers; ++k) partial[k] = 0;
    for (int64_t b = cg.first_row; b < cg.last_row; ++b) g.centers_of(b, j, partial);
  }
};

// Pass 2, one thread per (run of classes_per_thread classes, group of rows), the CPU's plan: each
// row of the run in turn, its non-target classes in loops without branches (vectorized), its
// target on its own.
template <typename T, typename O>
struct SoftmaxGradRuns {
  SoftmaxGradTile<T, O> g;
  int64_t classes_per_thread;

  DMLFAST_HD void operator()(int64_t block, int64_t thread, int64_t block_dim) const {
    const SoftmaxTile<T>& t = g.tile;
    const int64_t centers = t.classes.centers, classes = t.classes_in_tile();
    const int64_t runs = blocks_for(classes, classes_per_thread);
    const int64_t index = block * block_dim + thread;
    const int64_t run = index % runs, group = index / runs;
    const int64_t first_row = group * g.rows_per_group;
    if (first_row >= t.rows) return;
    const int64_t last_row = math::min(first_row + g.rows_per_group, t.rows);
    const int64_t from = run * classes_per_thread, to = math::min(from + classes_per_thread, classes);
    T* partial = g.cos_partial + group * t.cols;
    for (int64_t c = from * centers; c < to * centers; ++c) partial[c] = 0;
    for (int64_t b = first_row; b < last_row; ++b) {
      if (centers > 1) {
#ifndef __CUDA_ARCH__
        // Their run buffers would cost a GPU thread a stack frame.
        if (t.soft_center_runs()) {
          g.soft_centers(b, from, to, partial);
          continue;
        }
        if (t.classes.aggregation == kMaxCenter) {
          g.max_centers(b, from, to, partial);
          continue;
        }
#endif
        for (int64_t j = from; j < to; ++j) g.centers_of(b, j, partial + j * centers);
        continue;
      }
      const int64_t target = t.labels[b] - t.first_class;
      if (target < from || target >= to) {
        g.others(b, from, to, partial);
        continue;
      }
      g.others(b, from, target, partial);
      partial[target] += g.one_center(b, target, true);
      g.others(b, target + 1, to, partial);
    }
  }
};

}  // namespace dmlfast
