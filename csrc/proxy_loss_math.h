// The per-element math of every fused proxy loss, written once for the CPU and the GPU.
//
// Each "thread" function below is the whole work of one CUDA thread, written as a function of
// its launch coordinates (block, thread, block size) and plain pointers. The CUDA kernels in
// csrc/cuda/launch.cu are one-line shells around them; the CPU kernels in csrc/cpu/launch.cpp
// walk the same launch grid, so the index arithmetic, bounds checks and epilogues the GPU runs
// are the ones CI runs on the CPU. Notation follows SPEC-losses.md §0 and §7.
//
// Every function is a template over the accumulation type T: float for float32, bfloat16 and
// float16 inputs, double for float64 inputs (so that gradcheck runs in double precision).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DMLFAST_HD __host__ __device__ __forceinline__
#else
#define DMLFAST_HD inline
#endif

// Lets the host compiler vectorize a sum over a row (OpenMP SIMD; a no-op on the device and
// without OpenMP). The summation order it picks is fixed at compile time: still deterministic.
#define DMLFAST_PRAGMA(text) _Pragma(#text)
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define DMLFAST_SIMD_SUM(var) DMLFAST_PRAGMA(omp simd reduction(+ : var))
#else
#define DMLFAST_SIMD_SUM(var)
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
// A plain comparison (fmax is a library call on the host); the inputs are finite or the call
// fails its value checks anyway.
DMLFAST_HD float max(float a, float b) { return a > b ? a : b; }
DMLFAST_HD double max(double a, double b) { return a > b ? a : b; }
DMLFAST_HD float sqrt(float x) { return sqrtf(x); }
DMLFAST_HD double sqrt(double x) { return ::sqrt(x); }
}  // namespace math

// Official normalization x / sqrt(sum x^2 + eps) (SPEC §0). Its exact gradient is the projection
// (1/n)(g - <x_hat, g> x_hat) of project_row, so the two agree even for (near-)zero rows.
constexpr double kNormEps = 1e-12;
constexpr int kThreadsPerBlock = 128;

DMLFAST_HD int64_t blocks_for(int64_t n, int64_t threads) { return (n + threads - 1) / threads; }

// LSE0(u) = log(1 + sum_i e^{u_i}) (SPEC §0) from shift = max(0, max_i u_i) and
// sum = sum_i e^{u_i - shift}; an empty set gives 0. With shift = 0 it is log1p(sum), which keeps
// the digits of the tiny sums that well-separated negatives produce (SPEC §7.6).
template <typename T>
DMLFAST_HD T lse0_from_shifted(T shift, T sum) {
  return shift == T(0) ? math::log1p(sum) : shift + math::log(math::exp(-shift) + sum);
}

// A tile of S (or of G, written over it) of shape [rows, cols] addressed with explicit strides,
// so that each device can pick the layout its threads walk best (see csrc/fused_losses.cpp).
template <typename T>
struct TileView {
  T* data;
  int64_t row_stride;
  int64_t col_stride;
  DMLFAST_HD T& at(int64_t row, int64_t col) const {
    return data[row * row_stride + col * col_stride];
  }
};

// ---------------------------------------------------------------------------------------------
// Anchor family (Proxy-Anchor, SPEC §1.1 and §7.2).
//
// The dense pass over class tiles handles the negative pairs; the B positive pairs are handled
// sparsely (one gathered similarity per sample), so the dense pass needs no positive normalizer.
// Proxy-ISA (SPEC §3) is the same loss with a multiplier M in every exponent, computed here from
// per-class vectors, and normalizers that are sums of per-class mean multipliers.

// Per-class inputs of Proxy-ISA's multipliers M (SPEC §3.3, §7.4), each [C]. With `center` null
// every M is 1: plain Proxy-Anchor. M scales the exponents and takes no gradient.
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
  DMLFAST_HD T negative(int64_t c, T s) const {
    return (center != nullptr && s < threshold[c]) ? easy_negative[c] : T(1);
  }
};

template <typename T>
struct AnchorNegativeArgs {
  TileView<T> tile;        // [B, cols]: S on entry, G on exit
  const int64_t* labels;   // [B]
  int64_t rows;            // B
  int64_t cols;            // proxies in this tile
  int64_t first_class;     // global class index of column 0
  T alpha;
  T margin;
  IsaClassParams<T> isa;
  const T* neg_scale;      // one value on the device: dL/dS factor of the negatives (alpha / C)
  T* column_lse;           // [cols] out: the column's negative loss term
  T* column_mean_weight;   // [cols] out: mean of M over the column's negatives (0 if none)
};

// One thread per proxy column c: with v_bc = alpha M_bc (S_bc + margin) over the negatives
// (y_b != c), l_c = LSE0({v_bc}) and G_bc = neg_scale * M_bc * e^{v_bc - l_c}; 0 for positives.
// Three walks down the column (max, exponentials, scaling): one exponential per entry.
template <typename T>
DMLFAST_HD void anchor_negative_column_thread(int64_t block, int64_t thread, int64_t block_dim,
                                              const AnchorNegativeArgs<T>& a) {
  const int64_t c = block * block_dim + thread;
  if (c >= a.cols) return;
  const int64_t cls = a.first_class + c;
  T shift = 0;  // max(0, max_b v_bc): the zero logit of LSE0 takes part in the max
  for (int64_t b = 0; b < a.rows; ++b) {
    if (a.labels[b] == cls) continue;
    const T s = a.tile.at(b, c);
    shift = math::max(shift, a.alpha * a.isa.negative(cls, s) * (s + a.margin));
  }
  T sum = 0, weight_sum = 0;
  int64_t count = 0;
  for (int64_t b = 0; b < a.rows; ++b) {
    T& entry = a.tile.at(b, c);
    if (a.labels[b] == cls) {
      entry = 0;
      continue;
    }
    const T weight = a.isa.negative(cls, entry);
    const T e = math::exp(a.alpha * weight * (entry + a.margin) - shift);
    sum += e;
    weight_sum += weight;
    ++count;
    entry = weight * e;
  }
  a.column_lse[c] = lse0_from_shifted(shift, sum);
  a.column_mean_weight[c] = count > 0 ? weight_sum / T(count) : T(0);
  const T factor = *a.neg_scale / (math::exp(-shift) + sum);
  for (int64_t b = 0; b < a.rows; ++b) a.tile.at(b, c) *= factor;
}

// Whether sample b is the first of its class in the batch (the one that speaks for the class).
DMLFAST_HD bool first_of_its_class(const int64_t* labels, int64_t b) {
  for (int64_t j = 0; j < b; ++j) {
    if (labels[j] == labels[b]) return false;
  }
  return true;
}

template <typename T>
struct AnchorPositiveArgs {
  const T* pos_sim;         // [B]: s_b = <x_hat_b, p_hat_{y_b}>
  const int64_t* labels;    // [B]
  int64_t rows;             // B
  T alpha;
  T margin;
  IsaClassParams<T> isa;
  T* class_lse;             // [B] out: l+ of class y_b (the same for all its samples)
  T* is_first;              // [B] out: 1 where b is the first sample of its class, else 0
  T* weight;                // [B] out: M_b of the positive pair (b, y_b)
  T* class_mean_weight;     // [B] out: mean of M over the positives of class y_b
};

// One thread per sample b: l+_{y_b} = LSE0({-alpha M_j (s_j - margin) : y_j = y_b}), recomputed
// by every sample of the class in the same order (deterministic, no atomics), the class's mean M,
// and whether b is the class's first sample (the one that counts the class in the normalizer).
template <typename T>
DMLFAST_HD void anchor_positive_thread(int64_t block, int64_t thread, int64_t block_dim,
                                       const AnchorPositiveArgs<T>& a) {
  const int64_t b = block * block_dim + thread;
  if (b >= a.rows) return;
  const int64_t cls = a.labels[b];
  T shift = 0, weight_sum = 0;
  int64_t count = 0;
  for (int64_t j = 0; j < a.rows; ++j) {
    if (a.labels[j] != cls) continue;
    const T weight = a.isa.positive(cls, a.pos_sim[j]);
    shift = math::max(shift, -a.alpha * weight * (a.pos_sim[j] - a.margin));
    weight_sum += weight;
    ++count;
  }
  T sum = 0;
  for (int64_t j = 0; j < a.rows; ++j) {
    if (a.labels[j] != cls) continue;
    const T weight = a.isa.positive(cls, a.pos_sim[j]);
    sum += math::exp(-a.alpha * weight * (a.pos_sim[j] - a.margin) - shift);
  }
  a.class_lse[b] = lse0_from_shifted(shift, sum);
  a.is_first[b] = first_of_its_class(a.labels, b) ? T(1) : T(0);
  a.weight[b] = a.isa.positive(cls, a.pos_sim[b]);
  a.class_mean_weight[b] = weight_sum / T(count);
}

template <typename T>
struct PositiveScatterArgs {
  const T* pos_grad;          // [B]: g_b = dL/dS at the positive pair (b, y_b)
  const T* pos_sim;           // [B]: s_b
  const T* x_hat;             // [B, D]
  const T* p_hat_of_label;    // [B, D]: p_hat_{y_b}
  const T* norm_of_label;     // [B]: m_{y_b}
  const int64_t* labels;      // [B]
  int64_t rows;
  int64_t dim;
  int64_t dim_chunk;          // embedding components per thread (1 on the GPU: coalesced rows)
  T* class_grad;              // [B, D] out
};

// One thread per (sample b, chunk of dim_chunk components). The first sample of each class sums,
// in sample order, its class's positive pairs' part of dL/dp_c = (1/m_c) sum_b g_b (x_hat_b -
// s_b p_hat_c) (SPEC §7.1); every other sample writes zeros, so adding all B rows into dP is
// exact in any order.
template <typename T>
DMLFAST_HD void positive_scatter_thread(int64_t block, int64_t thread, int64_t block_dim,
                                        const PositiveScatterArgs<T>& a) {
  const int64_t chunks = blocks_for(a.dim, a.dim_chunk);
  const int64_t index = block * block_dim + thread;
  const int64_t b = index / chunks;
  if (b >= a.rows) return;
  const int64_t first = (index % chunks) * a.dim_chunk;
  const int64_t last = first + a.dim_chunk < a.dim ? first + a.dim_chunk : a.dim;
  T* out = a.class_grad + b * a.dim;
  for (int64_t d = first; d < last; ++d) out[d] = 0;
  if (!first_of_its_class(a.labels, b)) return;
  const int64_t cls = a.labels[b];
  const T* unit = a.p_hat_of_label + b * a.dim;
  for (int64_t j = b; j < a.rows; ++j) {
    if (a.labels[j] != cls) continue;
    const T g = a.pos_grad[j];
    const T gs = g * a.pos_sim[j];
    const T* x = a.x_hat + j * a.dim;
    for (int64_t d = first; d < last; ++d) out[d] += g * x[d] - gs * unit[d];
  }
  const T inv_norm = T(1) / a.norm_of_label[b];
  for (int64_t d = first; d < last; ++d) out[d] *= inv_norm;
}

// ---------------------------------------------------------------------------------------------
// IDML (SPEC §6, §7.5): Proxy-Anchor on the introspective similarity
//   S'_bc = 1 - (1 - S_bc) g_bc,  g_bc = exp(-(a_b + 4) / (5 d_bc)),
// with S the cosine, d_bc = ||x_b - p_c||^2 of the embedding as given (unit as the model emits
// it) and the raw proxy, and a_b = ||v_b||^2 of the uncertainty embedding. One raw GEMM
// R = X P^T gives both: S = R / (n m) and d = ||x||^2 + ||p||^2 - 2R. The dense pass writes S' into
// a tile, runs the unchanged anchor_negative_column_thread on it, then turns dL/dS' into the
// coefficients of the two backward GEMMs (idml_chain_column_thread).

// Beyond this exponent g = e^{-(a+4)/(5d)} < 2e-35: g and every derivative are taken as 0, which
// also guards d -> 0 (and d <= 0 from rounding when x is close to p).
constexpr double kIdmlMaxExponent = 80.0;

// d = ||x||^2 + ||p||^2 - 2 x.p from the raw dot product and the squared norms.
template <typename T>
DMLFAST_HD T introspective_distance(T dot, T x_sq, T p_sq) {
  return x_sq + p_sq - T(2) * dot;
}

// g = e^{-(a + 4) / (5 d)}; 0 where d <= 0 or the exponent passes kIdmlMaxExponent.
template <typename T>
DMLFAST_HD T introspective_gate(T dist, T uncertainty) {
  const T exponent = (uncertainty + T(4)) / (T(5) * dist);
  return (dist > T(0) && exponent < T(kIdmlMaxExponent)) ? math::exp(-exponent) : T(0);
}

// S' of one pair and its partial derivatives (SPEC §7.5).
template <typename T>
struct IntrospectivePair {
  T cosine;          // S
  T similarity;      // S'
  T by_cosine;       // dS'/dS = g
  T by_distance;     // dS'/dd = -(1 - S) g (a + 4) / (5 d^2)
  T by_uncertainty;  // dS'/da = (1 - S) g / (5 d)
};

// From the raw dot product x.p, ||x||^2 and n = sqrt(||x||^2 + eps), ||p||^2 and m, a, and the
// pair's gate g = introspective_gate(d, a) (computed once per pair: the similarity pass keeps it
// for the chain pass). g > 0 implies d > (a + 4) / (5 kIdmlMaxExponent), so the divisions are safe.
template <typename T>
DMLFAST_HD IntrospectivePair<T> introspective_pair(T dot, T x_sq, T x_norm, T p_sq, T p_norm,
                                                   T uncertainty, T gate) {
  IntrospectivePair<T> out;
  out.cosine = dot / (x_norm * p_norm);
  const T dissimilarity = T(1) - out.cosine;
  out.by_cosine = gate;
  if (gate > T(0)) {
    const T dist = introspective_distance(dot, x_sq, p_sq);
    out.by_uncertainty = dissimilarity * gate / (T(5) * dist);
    out.by_distance = -out.by_uncertainty * (uncertainty + T(4)) / dist;
  } else {
    out.by_uncertainty = out.by_distance = T(0);
  }
  out.similarity = T(1) - dissimilarity * gate;
  return out;
}

template <typename T>
struct IdmlPositiveArgs {
  const T* dot;          // [B]: x_b . p_{y_b}
  const T* x_sq;         // [B]: ||x_b||^2
  const T* x_norm;       // [B]: n_b
  const T* p_sq;         // [B]: ||p_{y_b}||^2
  const T* p_norm;       // [B]: m_{y_b}
  const T* uncertainty;  // [B]: a_b
  int64_t rows;
  T* similarity;         // [B] out: S'_{b, y_b}
};

// One thread per sample b: the introspective similarity of its positive pair.
template <typename T>
DMLFAST_HD void idml_positive_thread(int64_t block, int64_t thread, int64_t block_dim,
                                     const IdmlPositiveArgs<T>& a) {
  const int64_t b = block * block_dim + thread;
  if (b >= a.rows) return;
  const T gate = introspective_gate(introspective_distance(a.dot[b], a.x_sq[b], a.p_sq[b]),
                                    a.uncertainty[b]);
  a.similarity[b] = introspective_pair(a.dot[b], a.x_sq[b], a.x_norm[b], a.p_sq[b], a.p_norm[b],
                                       a.uncertainty[b], gate)
                        .similarity;
}

template <typename T>
struct IdmlTileArgs {
  TileView<T> dot;          // [B, cols]: R = X P^T on entry; the chain pass overwrites it with H
  TileView<T> similarity;   // [B, cols]: S' out (then G' = dL/dS' from the anchor kernel)
  TileView<T> gate;         // [B, cols]: g out, read back by the chain pass
  const int64_t* labels;    // [B]
  int64_t rows;             // B
  int64_t cols;             // proxies in this tile
  int64_t first_class;      // global class index of column 0
  const T* x_sq;            // [B]: ||x_b||^2
  const T* x_norm;          // [B]: n_b
  const T* uncertainty;     // [B]: a_b
  const T* p_sq;            // [cols]: ||p_c||^2
  const T* p_norm;          // [cols]: m_c
};

// One thread per proxy column c: g_bc and S'_bc for every row.
template <typename T>
DMLFAST_HD void idml_similarity_column_thread(int64_t block, int64_t thread, int64_t block_dim,
                                              const IdmlTileArgs<T>& a) {
  const int64_t c = block * block_dim + thread;
  if (c >= a.cols) return;
  for (int64_t b = 0; b < a.rows; ++b) {
    const T dot = a.dot.at(b, c);
    const T gate =
        introspective_gate(introspective_distance(dot, a.x_sq[b], a.p_sq[c]), a.uncertainty[b]);
    a.gate.at(b, c) = gate;
    a.similarity.at(b, c) = introspective_pair(dot, a.x_sq[b], a.x_norm[b], a.p_sq[c], a.p_norm[c],
                                               a.uncertainty[b], gate)
                                .similarity;
  }
}

template <typename T>
struct IdmlChainArgs {
  IdmlTileArgs<T> tile;     // its similarity tile holds G' = dL/dS' of the negatives (0 at positives)
  const T* pos_grad;        // [B]: G' of the positive pair (b, y_b)
  TileView<T> row_coef;     // [B, cols] out: E_bc, summed over c into the coefficient of x_b;
                            // may be tile.gate's memory (each entry is read before it is written)
  TileView<T> by_uncert;    // [B, cols] out: dL/da_b's term of pair (b, c), summed over c
  T* col_coef;              // [cols] out: the coefficient of p_c in dL/dp_c
};

// One thread per proxy column c. With G_S = G' g, G_d = G' dS'/dd and G_a = G' dS'/da:
//   dL/dx_b = sum_c H_bc p_c + x_b sum_c E_bc,   H = G_S / (n m) - 2 G_d,  E = 2 G_d - G_S S / n^2,
//   dL/dp_c = sum_b H_bc x_b + p_c sum_b (2 G_d - G_S S / m^2),  dL/da_b = sum_c G_a,
// (dS/dx = p/(n m) - S x/n^2, dd/dx = 2(x - p), dd/dp = -2(x - p)). H is written over R, so the
// driver's two GEMMs H P and H^T X finish the gradients.
template <typename T>
DMLFAST_HD void idml_chain_column_thread(int64_t block, int64_t thread, int64_t block_dim,
                                         const IdmlChainArgs<T>& a) {
  const IdmlTileArgs<T>& t = a.tile;
  const int64_t c = block * block_dim + thread;
  if (c >= t.cols) return;
  const int64_t cls = t.first_class + c;
  const T inv_p_sq = T(1) / (t.p_norm[c] * t.p_norm[c]);
  T col_sum = 0;
  for (int64_t b = 0; b < t.rows; ++b) {
    const T grad = t.labels[b] == cls ? a.pos_grad[b] : t.similarity.at(b, c);
    T& entry = t.dot.at(b, c);
    const IntrospectivePair<T> pair =
        introspective_pair(entry, t.x_sq[b], t.x_norm[b], t.p_sq[c], t.p_norm[c],
                           t.uncertainty[b], t.gate.at(b, c));
    const T grad_cos = grad * pair.by_cosine;
    const T grad_dist2 = T(2) * grad * pair.by_distance;
    const T x_norm = t.x_norm[b];
    entry = grad_cos / (x_norm * t.p_norm[c]) - grad_dist2;
    a.row_coef.at(b, c) = grad_dist2 - grad_cos * pair.cosine / (x_norm * x_norm);
    a.by_uncert.at(b, c) = grad * pair.by_uncertainty;
    col_sum += grad_dist2 - grad_cos * pair.cosine * inv_p_sq;
  }
  a.col_coef[c] = col_sum;
}

// ---------------------------------------------------------------------------------------------
// Softmax family (ProxyNCA, ProxyNCA++, Norm-SoftMax; SPEC §2 and §7.3): logits z = scale * S.
//
// Pass 1 walks the class tiles and keeps, per row, the running log-sum-exp over the classes of
// the denominator, the sum of all logits (label smoothing needs it) and the target logit. Each
// tile row is cut into chunks of `chunk_cols` columns, one thread per (row, chunk), so that a
// batch of a few hundred rows still fills a GPU; a per-row thread then folds the chunks' partial
// results into the running state. Pass 2 turns each tile of S into G = (scale / B)(softmax - T).

// Row sums run over up to millions of classes, so the running state is kept in double whatever T
// is: a float sum over 10^5 terms would lose ~1e-5 of the loss.
struct SoftmaxRowState {
  double* lse_max;       // [B] running log-sum-exp over the denominator's classes: max ...
  double* lse_sum;       // [B] ... and sum of e^{z - max}
  double* logit_sum;     // [B] sum over all classes of z_bc; null when not needed (no smoothing)
  double* target_logit;  // [B] z_{b, y_b}
};

// Per (chunk, row) results of pass 1 over one tile, each [chunks * B] with slot chunk * B + b.
struct SoftmaxChunkPartials {
  double* max;        // the chunk's largest denominator logit
  double* sum;        // sum of e^{z - max} over the chunk's denominator logits; 0 if it has none
  double* logit_sum;  // sum of all the chunk's logits
};

template <typename T>
struct SoftmaxTileArgs {
  TileView<T> tile;        // [B, cols]: S in; see the passes for what is written back
  const int64_t* labels;   // [B]
  int64_t rows;
  int64_t cols;
  int64_t chunk_cols;      // columns per thread; the tile has blocks_for(cols, chunk_cols) chunks
  int64_t first_class;
  T scale;
  bool exclude_positive;   // the paper's classic form: the target is not in the denominator
  SoftmaxRowState state;
  SoftmaxChunkPartials partials;
  // [chunks * B] or null. When set, pass 1 overwrites the tile with e^{z - shift} (0 for an
  // excluded target), shift being the chunk's max, recorded here, so that pass 2 needs one
  // exponential per (row, chunk), not per entry.
  T* tile_shift;
};

// The (row, chunk) a softmax thread owns, and its columns [first, last); false past the tile.
struct SoftmaxSlot {
  int64_t row, slot, first, last;
};
DMLFAST_HD bool softmax_slot(int64_t index, int64_t rows, int64_t cols, int64_t chunk_cols,
                             SoftmaxSlot& out) {
  const int64_t chunk = index / rows;
  out.row = index % rows;
  out.slot = index;  // chunk * rows + row
  out.first = chunk * chunk_cols;
  out.last = out.first + chunk_cols < cols ? out.first + chunk_cols : cols;
  return out.first < cols;
}

// Pass 1, one thread per (row b, chunk): the chunk's max, sum of exponentials and sum of logits.
template <typename T>
DMLFAST_HD void softmax_chunk_reduce_thread(int64_t block, int64_t thread, int64_t block_dim,
                                            const SoftmaxTileArgs<T>& a) {
  SoftmaxSlot s;
  if (!softmax_slot(block * block_dim + thread, a.rows, a.cols, a.chunk_cols, s)) return;
  const int64_t b = s.row;
  const int64_t target = a.labels[b] - a.first_class;
  bool any = false;
  T chunk_max = 0;
  double logit_sum = 0;
  for (int64_t c = s.first; c < s.last; ++c) {
    const T z = a.scale * a.tile.at(b, c);
    logit_sum += z;
    if (c == target) {
      a.state.target_logit[b] = z;
      if (a.exclude_positive) continue;
    }
    chunk_max = any ? math::max(chunk_max, z) : z;
    any = true;
  }
  double chunk_sum = 0;
  for (int64_t c = s.first; c < s.last; ++c) {
    T& entry = a.tile.at(b, c);
    const T e = (c == target && a.exclude_positive) ? T(0) : math::exp(a.scale * entry - chunk_max);
    if (a.tile_shift != nullptr) entry = e;
    chunk_sum += e;
  }
  if (a.tile_shift != nullptr) a.tile_shift[s.slot] = chunk_max;
  a.partials.max[s.slot] = chunk_max;
  a.partials.sum[s.slot] = any ? chunk_sum : 0.0;
  a.partials.logit_sum[s.slot] = logit_sum;
}

struct SoftmaxCombineArgs {
  SoftmaxChunkPartials partials;
  int64_t rows;
  int64_t chunks;
  SoftmaxRowState state;
};

// Pass 1, then one thread per row b: fold the tile's chunks into the row's running state.
DMLFAST_HD void softmax_row_combine_thread(int64_t block, int64_t thread, int64_t block_dim,
                                           const SoftmaxCombineArgs& a) {
  const int64_t b = block * block_dim + thread;
  if (b >= a.rows) return;
  double lse_max = a.state.lse_max[b];
  double lse_sum = a.state.lse_sum[b];
  double logit_sum = 0;
  for (int64_t chunk = 0; chunk < a.chunks; ++chunk) {
    const int64_t slot = chunk * a.rows + b;
    logit_sum += a.partials.logit_sum[slot];
    const double sum = a.partials.sum[slot];
    if (sum == 0) continue;  // the chunk held only the excluded target
    const double max = a.partials.max[slot];
    if (lse_sum > 0) {
      const double new_max = math::max(lse_max, max);
      lse_sum = lse_sum * math::exp(lse_max - new_max) + sum * math::exp(max - new_max);
      lse_max = new_max;
    } else {
      lse_max = max;
      lse_sum = sum;
    }
  }
  a.state.lse_max[b] = lse_max;
  a.state.lse_sum[b] = lse_sum;
  if (a.state.logit_sum != nullptr) a.state.logit_sum[b] += logit_sum;
}

template <typename T>
struct SoftmaxGradArgs {
  SoftmaxTileArgs<T> tile;  // its tile_shift says whether the tile holds S or pass 1's e^{z - shift}
  const T* row_lse;         // [B]: log of the softmax denominator
  T target_weight;          // T_{b,y_b}: 1 - smoothing
  T other_weight;           // T_{b,c != y_b}: smoothing / (C - 1)
  T grad_scale;             // scale / B
};

// Pass 2, one thread per (row b, chunk): G_bc = (scale/B) (p_bc - T_bc), where p_bc =
// e^{z_bc - lse_b} (and p_{b,y_b} = 0 when the target is excluded from the denominator).
template <typename T>
DMLFAST_HD void softmax_chunk_grad_thread(int64_t block, int64_t thread, int64_t block_dim,
                                          const SoftmaxGradArgs<T>& a) {
  const SoftmaxTileArgs<T>& t = a.tile;
  SoftmaxSlot s;
  if (!softmax_slot(block * block_dim + thread, t.rows, t.cols, t.chunk_cols, s)) return;
  const int64_t b = s.row;
  const int64_t target = t.labels[b] - t.first_class;
  const T lse = a.row_lse[b];
  const bool stored = t.tile_shift != nullptr;
  const T rescale = stored ? math::exp(t.tile_shift[s.slot] - lse) : T(0);
  for (int64_t c = s.first; c < s.last; ++c) {
    T& entry = t.tile.at(b, c);
    const bool is_target = c == target;
    T prob;
    if (stored) {
      prob = entry * rescale;
    } else {
      prob = (is_target && t.exclude_positive) ? T(0) : math::exp(t.scale * entry - lse);
    }
    entry = a.grad_scale * (prob - (is_target ? a.target_weight : a.other_weight));
  }
}

// ---------------------------------------------------------------------------------------------
// Normalization and its backward, one row at a time (the CPU path; the CUDA path composes the
// same formulas from ATen reductions, see csrc/rows.cpp).

// out = in / n with n = sqrt(sum in^2 + eps); returns n (non-finite when the row is).
template <typename T, typename In>
DMLFAST_HD T normalize_row(const In* in, int64_t dim, T* out) {
  T sq = 0;
  DMLFAST_SIMD_SUM(sq)
  for (int64_t d = 0; d < dim; ++d) {
    const T v = static_cast<T>(in[d]);
    sq += v * v;
  }
  const T norm = math::sqrt(sq + T(kNormEps));
  const T inv = T(1) / norm;
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(in[d]) * inv;
  return norm;
}

// Backward of the normalization: out = (1/n)(g - <unit, g> unit) (SPEC §7.1).
template <typename T, typename Out>
DMLFAST_HD void project_row(const T* g, const T* unit, T norm, int64_t dim, Out* out) {
  T dot = 0;
  DMLFAST_SIMD_SUM(dot)
  for (int64_t d = 0; d < dim; ++d) dot += g[d] * unit[d];
  const T inv = T(1) / norm;
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<Out>(inv * (g[d] - dot * unit[d]));
}

}  // namespace dmlfast
