// The fused proxy losses: one forward that returns the loss and both gradients (SPEC §7).
//
// One driver serves the CPU and CUDA: the GEMMs go to ATen (MKL/oneDNN on the CPU, cuBLAS on
// the GPU, on the current stream), the epilogues to the kernels of launch.h. The loop runs over
// tiles of proxies, so memory is O(B*D + C*D + B*tile): no B x C tensor, whatever C is. The
// internal ATen calls run with autocast excluded: the accumulation dtype is chosen here.
#include "fused_losses.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "launch.h"
#include "rows.h"

namespace dmlfast {
namespace {

// Proxies per tile. On the CPU a tile of S plus one of P_hat stays near L2 size; on the GPU
// tiles are large enough to keep the GEMMs busy and few enough launches.
int64_t tile_columns(const at::Tensor& x, int64_t num_classes) {
  const int64_t batch = x.size(0), dim = x.size(1);
  const int64_t budget = x.is_cuda() ? (int64_t{1} << 24) : (int64_t{1} << 19);  // floats
  const int64_t tile = std::max<int64_t>(256, budget / std::max<int64_t>(batch + dim, 1));
  return std::min(tile, num_classes);
}

// A [B, cols] matrix X_hat P_hat^T whose memory layout suits the kernel that walks it:
// `column_contiguous` stores each column's B entries next to each other.
at::Tensor similarity_tile(const at::Tensor& x_hat, const at::Tensor& p_hat,
                           bool column_contiguous) {
  return column_contiguous ? at::mm(p_hat, x_hat.t()).t() : at::mm(x_hat, p_hat.t());
}

template <typename T>
TileView<T> view_of(const at::Tensor& tile) {
  return {tile.data_ptr<T>(), tile.stride(0), tile.stride(1)};
}

std::string describe(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type())) + " tensor of shape " +
         c10::str(t.sizes()) + " on " + t.device().str();
}

// Checks of shapes, dtypes and devices: the metadata the caller gave, no device reads.
void check_metadata(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                    const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": embeddings must be 2-D (batch, dim), got a ",
                    describe(x));
  TORCH_CHECK_VALUE(p.dim() == 2, op, ": proxies must be 2-D (num_classes, dim), got a ",
                    describe(p));
  TORCH_CHECK_VALUE(labels.dim() == 1, op, ": labels must be 1-D (batch,), got a ",
                    describe(labels));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": embeddings must be float32, bfloat16, float16 or float64, got ",
                   describe(x));
  TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op,
                   ": proxies must be float32, bfloat16, float16 or float64, got ", describe(p));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   describe(labels));
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": the batch is empty (embeddings has 0 rows)");
  TORCH_CHECK_VALUE(p.size(0) > 0, op, ": proxies has 0 rows (num_classes must be >= 1)");
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": embeddings have dimension 0");
  TORCH_CHECK_VALUE(labels.size(0) == x.size(0), op,
                    ": labels must have one entry per embedding: embeddings has ", x.size(0),
                    " rows, labels has ", labels.size(0));
  TORCH_CHECK_VALUE(p.size(1) == x.size(1), op,
                    ": embedding dimension and proxy dimension differ: embeddings are ",
                    x.size(1), "-d, proxies are ", p.size(1), "-d");
  TORCH_CHECK_VALUE(x.device() == p.device() && x.device() == labels.device(), op,
                    ": embeddings, proxies and labels must be on one device, got ", x.device(),
                    ", ", p.device(), " and ", labels.device());
}

// Value checks computed on the device while the loss runs and read back once at the end
// (one host read per call on CUDA): labels in range, finite embeddings and proxies. The flags
// are updated in place, so the tile loop leaves no small tensors behind to fragment the heap.
class ValueChecks {
 public:
  ValueChecks(const at::Tensor& labels, int64_t num_classes, const char* op)
      : num_classes_(num_classes), op_(op) {
    const auto [min, max] = at::aminmax(labels);
    label_range_ = at::stack({min, max}).to(at::kDouble);
    const auto flag = labels.options().dtype(at::kBool);
    x_finite_ = at::ones({1}, flag);
    p_finite_ = at::ones({1}, flag);
    u_finite_ = at::ones({1}, flag);
  }
  // `norms` are row norms: a row with a NaN or Inf entry has a non-finite norm.
  void add_norms(const at::Tensor& norms, bool embeddings) {
    (embeddings ? x_finite_ : p_finite_).logical_and_(at::isfinite(norms).all());
  }
  // IDML's uncertainty embeddings, by their squared row norms.
  void add_uncertainty_norms(const at::Tensor& norms) {
    u_finite_.logical_and_(at::isfinite(norms).all());
  }
  // Raises if any check failed. Call before returning results; `uncertainty` is IDML's.
  void raise_if_failed(const at::Tensor& x, const at::Tensor& p,
                       const at::Tensor& uncertainty = at::Tensor()) const {
    const at::Tensor host = at::cat({label_range_, x_finite_.to(at::kDouble),
                                     p_finite_.to(at::kDouble), u_finite_.to(at::kDouble)})
                                .cpu();
    const double* v = host.const_data_ptr<double>();
    TORCH_CHECK_VALUE(v[0] >= 0 && v[1] < num_classes_, op_, ": labels must be in [0, ",
                      num_classes_, ") (num_classes = proxies.shape[0]), got min ",
                      static_cast<int64_t>(v[0]), " and max ", static_cast<int64_t>(v[1]));
    TORCH_CHECK_VALUE(v[2] != 0, op_, ": embeddings contain NaN or Inf (first bad row: ",
                      first_bad_row(x), ")");
    TORCH_CHECK_VALUE(v[3] != 0, op_, ": proxies contain NaN or Inf (first bad row: ",
                      first_bad_row(p), ")");
    TORCH_CHECK_VALUE(v[4] != 0, op_, ": uncertainty contains NaN or Inf (first bad row: ",
                      first_bad_row(uncertainty), ")");
  }

 private:
  static int64_t first_bad_row(const at::Tensor& t) {
    return at::logical_not(at::isfinite(t).all(1)).to(at::kInt).argmax().item<int64_t>();
  }
  int64_t num_classes_;
  const char* op_;
  at::Tensor label_range_, x_finite_, p_finite_, u_finite_;
};

// Whether the math accumulates in float64: an input is float64 (float32 otherwise).
bool has_float64(const at::Tensor& x, const at::Tensor& p) {
  return x.scalar_type() == at::kDouble || p.scalar_type() == at::kDouble;
}

// `impl(T{})` with the accumulation type T (double when `wide`, else float), on the device of
// `on` with autocast excluded: the ATen calls inside run in the dtype the op chose.
template <typename Impl>
auto run_accumulating(const at::Tensor& on, bool wide, Impl&& impl) {
  const c10::DeviceGuard guard(on.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return wide ? impl(double{}) : impl(float{});
}

// The classes this call's proxies stand for: rows 0..local-1 of `proxies` are classes
// offset..offset+local-1 of `total`. Unsharded, offset = 0 and local = total. Sharded across
// processes (dmlfast.sharded), labels are global and the normalizers count all `total` classes.
struct ClassShard {
  int64_t offset;
  int64_t local;
  int64_t total;
  bool sharded() const { return offset != 0 || local != total; }
};

// `num_classes` < 0 means "all": the proxies are every class.
ClassShard class_shard(const at::Tensor& proxies, int64_t class_offset, int64_t num_classes,
                       const char* op) {
  const int64_t local = proxies.size(0);
  const int64_t total = num_classes < 0 ? local : num_classes;
  TORCH_CHECK_VALUE(class_offset >= 0 && class_offset + local <= total, op,
                    ": the proxies (", local, " rows) must be classes [class_offset, class_offset + ",
                    local, ") of num_classes = ", total, ", got class_offset ", class_offset);
  return {class_offset, local, total};
}

// Labels as the kernels and gathers use them (one int64 tensor each, contiguous):
// `kernel` is compared with local class indices (first_class + column), so a label of another
// shard never matches a column; `row` is a valid proxy row for each sample (its label's when it
// is in this shard), for gathers; `owned` (accumulation dtype, defined only when sharded) is 1
// where the sample's class is in this shard. Unsharded, both label tensors are the labels clamped
// to [0, C), so every gather and per-class lookup stays in bounds until the value checks raise
// on out-of-range labels (whose results are never returned).
struct ShardLabels {
  at::Tensor kernel;
  at::Tensor row;
  at::Tensor owned;
};

ShardLabels shard_labels(const at::Tensor& labels, const ClassShard& shard,
                         const at::TensorOptions& acc) {
  if (!shard.sharded()) {
    const at::Tensor safe = labels.clamp(0, shard.local - 1).contiguous();
    return {safe, safe, at::Tensor()};
  }
  const at::Tensor local = (labels - shard.offset).contiguous();
  const at::Tensor owned = at::logical_and(local >= 0, local < shard.local).to(acc.dtype());
  return {local, local.clamp(0, shard.local - 1).contiguous(), owned};
}

// ---------------------------------------------------------------------------------------------
// Anchor family.

// The positive pairs' part of the anchor family, sparse (one similarity s_b per sample): per
// class l+ = LSE0(-alpha M (s - margin)), the loss sum_c l+_c / W+ and g_b = dL/ds_b =
// -(alpha M_b / W+) e^{u_b - l+} (SPEC §7.2, §7.4; W+ = |P+| when M = 1). W+ counts every class
// of the batch; with `owned` defined (sharded), only this shard's classes enter the loss and g.
template <typename T>
std::tuple<at::Tensor, at::Tensor> anchor_positive_terms(const at::Tensor& on,
                                                         const at::Tensor& pos_sim,
                                                         const int64_t* label_ptr, double margin,
                                                         double alpha,
                                                         const IsaClassParams<T>& isa_view,
                                                         const at::Tensor& owned) {
  const int64_t B = pos_sim.size(0);
  const auto acc = pos_sim.options();
  at::Tensor class_lse = at::empty({B}, acc), is_first = at::empty({B}, acc);
  at::Tensor pos_weight = at::empty({B}, acc), class_mean_weight = at::empty({B}, acc);
  launch(on, B,
         AnchorPositiveArgs<T>{pos_sim.const_data_ptr<T>(), label_ptr, B, T(alpha), T(margin),
                               isa_view, class_lse.data_ptr<T>(), is_first.data_ptr<T>(),
                               pos_weight.data_ptr<T>(), class_mean_weight.data_ptr<T>()});
  const at::Tensor pos_normalizer = (is_first * class_mean_weight).sum().clamp_min(1e-30);
  const at::Tensor counted = owned.defined() ? is_first * owned : is_first;
  const at::Tensor pos_loss = (class_lse * counted).sum() / pos_normalizer;
  const at::Tensor pos_exponent = pos_sim.sub(margin).mul_(pos_weight).mul_(-alpha);
  at::Tensor pos_grad =
      at::exp(pos_exponent.sub_(class_lse)).mul_(pos_weight).mul_(-alpha).div_(pos_normalizer);
  if (owned.defined()) pos_grad.mul_(owned);
  return {pos_loss, pos_grad};
}

// Embedding components per positive-scatter thread. On the GPU one per thread: B threads each
// walking whole rows left it nearly idle, with every warp access strided by D. On the CPU 128
// contiguous components, several chunks per row at common sizes.
constexpr int64_t kScatterChunkCuda = 1;
constexpr int64_t kScatterChunkCpu = 128;

// Proxy-Anchor, and Proxy-ISA when `isa_params` ([4, C]: centre, threshold, weight,
// easy-negative weight per class) is defined. With M = 1 the normalizers are |P+| and C; with
// ISA they are sums of per-class mean multipliers (SPEC §3.1), W+ known after the sparse
// positive pass and W- only after the last tile, so the negatives' part is rescaled at the end.
// Sharded (plain Proxy-Anchor only), every term is per proxy column: this shard's columns give
// their share of the loss and of dX, with |P+| and C of all classes (summed across shards).
template <typename T>
LossAndGrads proxy_anchor_impl(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                               double margin, double alpha, const at::Tensor& isa_params,
                               bool filter_positives, const ClassShard& shard) {
  const char* op = "proxy_anchor_loss";
  const int64_t B = x.size(0), D = x.size(1), C = p.size(0);
  const auto acc = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  ValueChecks checks(labels, shard.total, op);
  const ShardLabels shard_label = shard_labels(labels, shard, acc);
  const at::Tensor& safe_labels = shard_label.row;
  const int64_t* label_ptr = shard_label.kernel.const_data_ptr<int64_t>();
  const bool is_isa = isa_params.defined();
  const at::Tensor isa = is_isa ? isa_params.to(acc.dtype()).contiguous() : at::Tensor();
  const IsaClassParams<T> isa_view =
      is_isa ? IsaClassParams<T>{isa[0].const_data_ptr<T>(), isa[1].const_data_ptr<T>(),
                                 isa[2].const_data_ptr<T>(), isa[3].const_data_ptr<T>(),
                                 filter_positives}
             : IsaClassParams<T>{nullptr, nullptr, nullptr, nullptr, false};

  const UnitRows xs = normalize_rows(x.to(acc.dtype()));
  const at::Tensor& x_hat = xs.unit;
  checks.add_norms(xs.norm, /*embeddings=*/true);

  // Positive pairs, sparse: s_b, M_b, l+ per class, W+ and g_b = -(alpha M_b / W+) e^{u_b - l+}.
  const UnitRows ps_y = normalize_rows(p.index_select(0, safe_labels).to(acc.dtype()));
  const at::Tensor pos_sim = (x_hat * ps_y.unit).sum(1);
  at::Tensor pos_loss, pos_grad;
  std::tie(pos_loss, pos_grad) =
      anchor_positive_terms<T>(x, pos_sim, label_ptr, margin, alpha, isa_view, shard_label.owned);

  // Negative pairs, dense, tile by tile: G = dL/dS, A = G P_hat, dP = proj(G^T X_hat).
  at::Tensor grad_x_neg = at::zeros({B, D}, acc);
  at::Tensor grad_p = at::empty_like(p, at::MemoryFormat::Contiguous);
  at::Tensor neg_lse = at::empty({C}, acc), neg_mean_weight = at::empty({C}, acc);
  const double total = static_cast<double>(shard.total);
  const at::Tensor neg_scale = at::full({1}, is_isa ? alpha : alpha / total, acc);
  const bool column_contiguous = !x.is_cuda();  // one thread per column walks the rows
  const int64_t tile = tile_columns(x, C);
  for (int64_t first = 0; first < C; first += tile) {
    const int64_t cols = std::min(tile, C - first);
    const UnitRows ps = normalize_rows(p.narrow(0, first, cols).to(acc.dtype()));
    checks.add_norms(ps.norm, /*embeddings=*/false);
    at::Tensor sim = similarity_tile(x_hat, ps.unit, column_contiguous);
    launch(x, cols,
           AnchorNegativeArgs<T>{view_of<T>(sim), label_ptr, B, cols, first, T(alpha), T(margin),
                                 isa_view, neg_scale.const_data_ptr<T>(),
                                 neg_lse.data_ptr<T>() + first,
                                 neg_mean_weight.data_ptr<T>() + first});
    grad_x_neg.addmm_(sim, ps.unit);
    project_rows(at::mm(sim.t(), x_hat), ps, grad_p.narrow(0, first, cols));
  }
  at::Tensor neg_loss = neg_lse.sum();
  if (is_isa) {
    const at::Tensor neg_normalizer = neg_mean_weight.sum().clamp_min(1e-30);
    neg_loss = neg_loss / neg_normalizer;
    grad_x_neg.div_(neg_normalizer);
    grad_p.div_(neg_normalizer);
  } else {
    neg_loss = neg_loss / total;
  }

  at::Tensor class_grad = at::empty({B, D}, acc);
  const int64_t dim_chunk = x.is_cuda() ? kScatterChunkCuda : kScatterChunkCpu;
  launch(x, B * blocks_for(D, dim_chunk),
         PositiveScatterArgs<T>{pos_grad.const_data_ptr<T>(), pos_sim.const_data_ptr<T>(),
                                x_hat.const_data_ptr<T>(), ps_y.unit.const_data_ptr<T>(),
                                ps_y.norm.const_data_ptr<T>(), label_ptr, B, D, dim_chunk,
                                class_grad.data_ptr<T>()});
  grad_p.index_add_(0, safe_labels, class_grad.to(grad_p.scalar_type()));

  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  project_rows(grad_x_neg.addcmul_(ps_y.unit, pos_grad.unsqueeze(1)), xs, grad_x);
  checks.raise_if_failed(x, p);
  return {pos_loss + neg_loss, grad_x, grad_p};
}

// ---------------------------------------------------------------------------------------------
// IDML: Proxy-Anchor on the introspective similarity S' (SPEC §6, §7.5; proxy_loss_math.h).
//
// The positive pairs go through the anchor family's sparse positive pass on S'_{b, y_b}. Per tile
// of proxies: one raw GEMM R = X P^T, S' written into a tile, the unchanged negative column
// kernel, then the chain kernel, which folds dL/dS' (its positive entries from the sparse pass)
// into H, so dX += H P and dP = H^T X + diag(col_coef) P: the same three GEMMs as Proxy-Anchor.

// An uninitialized [rows, cols] tile laid out like similarity_tile's.
at::Tensor empty_tile(const at::TensorOptions& options, int64_t rows, int64_t cols,
                      bool column_contiguous) {
  return column_contiguous ? at::empty({cols, rows}, options).t() : at::empty({rows, cols}, options);
}

template <typename T>
IdmlLossAndGrads idml_impl(const at::Tensor& x, const at::Tensor& v, const at::Tensor& p,
                           const at::Tensor& labels, double margin, double alpha,
                           const ClassShard& shard) {
  const char* op = "idml_proxy_anchor_loss";
  const int64_t B = x.size(0), D = x.size(1), C = p.size(0);
  const auto acc = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  ValueChecks checks(labels, shard.total, op);
  const ShardLabels shard_label = shard_labels(labels, shard, acc);
  const at::Tensor& safe_labels = shard_label.row;
  const int64_t* label_ptr = shard_label.kernel.const_data_ptr<int64_t>();
  const IsaClassParams<T> plain{nullptr, nullptr, nullptr, nullptr, false};

  const at::Tensor xa = x.to(acc.dtype()).contiguous();
  const at::Tensor x_sq = xa.square().sum(1);
  const at::Tensor x_norm = (x_sq + kNormEps).sqrt_();
  checks.add_norms(x_norm, /*embeddings=*/true);
  const at::Tensor va = v.to(acc.dtype()).contiguous();
  const at::Tensor uncertainty = va.square().sum(1);
  checks.add_uncertainty_norms(uncertainty);

  // Positive pairs, sparse: S'_{b, y_b}, then Proxy-Anchor's positive terms on it.
  const at::Tensor p_y = p.index_select(0, safe_labels).to(acc.dtype());
  const at::Tensor p_y_sq = p_y.square().sum(1);
  const at::Tensor p_y_norm = (p_y_sq + kNormEps).sqrt_();
  const at::Tensor pos_dot = (xa * p_y).sum(1);
  const at::Tensor pos_sim = at::empty({B}, acc);
  launch(x, B,
         IdmlPositiveArgs<T>{pos_dot.const_data_ptr<T>(), x_sq.const_data_ptr<T>(),
                             x_norm.const_data_ptr<T>(), p_y_sq.const_data_ptr<T>(),
                             p_y_norm.const_data_ptr<T>(), uncertainty.const_data_ptr<T>(), B,
                             pos_sim.data_ptr<T>()});
  at::Tensor pos_loss, pos_grad;
  std::tie(pos_loss, pos_grad) =
      anchor_positive_terms<T>(x, pos_sim, label_ptr, margin, alpha, plain, shard_label.owned);

  // All pairs, dense, tile by tile.
  at::Tensor grad_x = at::zeros({B, D}, acc);
  at::Tensor x_coef = at::zeros({B}, acc), grad_uncertainty_sq = at::zeros({B}, acc);
  at::Tensor grad_p = at::empty_like(p, at::MemoryFormat::Contiguous);
  at::Tensor neg_lse = at::empty({C}, acc), neg_mean_weight = at::empty({C}, acc);
  const double total = static_cast<double>(shard.total);
  const at::Tensor neg_scale = at::full({1}, alpha / total, acc);
  const bool column_contiguous = !x.is_cuda();  // one thread per column walks the rows
  const int64_t tile = tile_columns(x, C);
  for (int64_t first = 0; first < C; first += tile) {
    const int64_t cols = std::min(tile, C - first);
    const at::Tensor p_tile = p.narrow(0, first, cols).to(acc.dtype()).contiguous();
    const at::Tensor p_sq = p_tile.square().sum(1);
    const at::Tensor p_norm = (p_sq + kNormEps).sqrt_();
    checks.add_norms(p_norm, /*embeddings=*/false);
    at::Tensor dot = similarity_tile(xa, p_tile, column_contiguous);
    at::Tensor sim = empty_tile(acc, B, cols, column_contiguous);
    at::Tensor row_coef = empty_tile(acc, B, cols, column_contiguous);  // holds g until the chain
    at::Tensor by_uncert = empty_tile(acc, B, cols, column_contiguous);
    at::Tensor col_coef = at::empty({cols}, acc);
    const IdmlTileArgs<T> tile_args{view_of<T>(dot), view_of<T>(sim), view_of<T>(row_coef),
                                    label_ptr, B, cols, first,
                                    x_sq.const_data_ptr<T>(), x_norm.const_data_ptr<T>(),
                                    uncertainty.const_data_ptr<T>(), p_sq.const_data_ptr<T>(),
                                    p_norm.const_data_ptr<T>()};
    launch(x, cols, tile_args);
    launch(x, cols,
           AnchorNegativeArgs<T>{view_of<T>(sim), label_ptr, B, cols, first, T(alpha), T(margin),
                                 plain, neg_scale.const_data_ptr<T>(),
                                 neg_lse.data_ptr<T>() + first,
                                 neg_mean_weight.data_ptr<T>() + first});
    launch(x, cols,
           IdmlChainArgs<T>{tile_args, pos_grad.const_data_ptr<T>(), view_of<T>(row_coef),
                            view_of<T>(by_uncert), col_coef.data_ptr<T>()});
    grad_x.addmm_(dot, p_tile);
    x_coef.add_(row_coef.sum(1));
    grad_uncertainty_sq.add_(by_uncert.sum(1));
    grad_p.narrow(0, first, cols).copy_(at::mm(dot.t(), xa).addcmul_(p_tile, col_coef.unsqueeze(1)));
  }
  const at::Tensor neg_loss = neg_lse.sum() / total;
  const at::Tensor grad_embeddings = grad_x.addcmul_(xa, x_coef.unsqueeze(1)).to(x.scalar_type());
  const at::Tensor grad_v =
      va.mul(grad_uncertainty_sq.mul_(2).unsqueeze(1)).to(v.scalar_type());
  checks.raise_if_failed(x, p, v);
  return {pos_loss + neg_loss, grad_embeddings, grad_v, grad_p};
}

// ---------------------------------------------------------------------------------------------
// Softmax family.
//
// Two passes over tiles of proxies: pass 1 reduces each row's log-sum-exp (online max and sum),
// logit sum and target logit; pass 2 writes G = dL/dS tile by tile from the row LSE and runs the
// GEMMs. Unsharded, one call runs both (reusing pass 1's tiles when they fit). Sharded across
// processes, each pass is its own op, so that the row statistics can be reduced across shards
// in between (a distributed log-sum-exp, as class-sharded softmax in Partial FC).

// Bytes of pass-1 tiles (exponentials and P_hat) that pass 2 reuses instead of recomputing them.
// Beyond this budget the tiles are recomputed, so memory stays bounded for any number of classes.
constexpr int64_t kSoftmaxReuseBytes = int64_t{64} << 20;

// Columns per softmax thread. One thread per row would leave a 256-row batch with 256 threads
// (an H100 holds ~270k; that design measured 6-21x slower than eager there), so rows are cut
// into chunks: 32 columns on the GPU, coalesced across neighbouring rows; 256 contiguous columns
// on the CPU, long enough for SIMD and enough chunks for several cores.
constexpr int64_t kSoftmaxChunkColumnsCuda = 32;
constexpr int64_t kSoftmaxChunkColumnsCpu = 256;

// Per-row statistics of pass 1, each [B] float64: the denominator's running max and sum of
// e^{z - max} (sum 0 while no logit entered), the sum of all logits z_bc and the target logit
// z_{b, y_b} (0 where the target is not among these proxies).
struct SoftmaxRows {
  at::Tensor max, sum, logit_sum, target;
};

SoftmaxRows empty_softmax_rows(const at::Tensor& x) {
  const auto wide = x.options().dtype(at::kDouble);
  const int64_t B = x.size(0);
  return {at::zeros({B}, wide), at::zeros({B}, wide), at::zeros({B}, wide), at::zeros({B}, wide)};
}

// The loss (1/B) sum_b [LSE_b - (1 - eps) z_{b,y_b} - eps/(C-1) (sum_c z_bc - z_{b,y_b})]
// (SPEC §7.3) from complete row statistics, in the accumulation dtype of `acc`.
at::Tensor softmax_loss(const SoftmaxRows& rows, double smoothing, int64_t num_classes,
                        const at::TensorOptions& acc) {
  const double other_weight = num_classes > 1 ? smoothing / static_cast<double>(num_classes - 1) : 0.0;
  const at::Tensor row_lse = rows.max + at::log(rows.sum);
  return (row_lse - (1.0 - smoothing) * rows.target - other_weight * (rows.logit_sum - rows.target))
      .mean()
      .to(acc.dtype());
}

// One softmax-family call: its checked inputs, how its proxies are tiled, and the two passes.
template <typename T>
class SoftmaxTiles {
 public:
  // A tile of S; after pass 1 with `keep`, pass 1's exponentials e^{z - shift} and the shifts.
  struct Tile {
    UnitRows proxies;
    at::Tensor sim;
    at::Tensor shift;
  };

  // `x` and `p` must outlive the object. Starts the value checks and normalizes the embeddings.
  SoftmaxTiles(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
               const ClassShard& shard, double scale, bool exclude_positive, const char* op)
      : x_(x),
        p_(p),
        acc_(x.options().dtype(c10::CppTypeToScalarType<T>::value)),
        checks_(labels, shard.total, op),
        labels_(shard_labels(labels, shard, acc_)),
        xs_(normalize_rows(x.to(acc_.dtype()))),
        num_classes_(shard.total),
        scale_(scale),
        exclude_positive_(exclude_positive),
        tile_(tile_columns(x, p.size(0))),
        chunk_cols_(x.is_cuda() ? kSoftmaxChunkColumnsCuda : kSoftmaxChunkColumnsCpu),
        column_contiguous_(x.is_cuda()) {  // neighbouring threads own neighbouring rows
    checks_.add_norms(xs_.norm, /*embeddings=*/true);
  }

  // Whether pass 1's tiles fit the reuse budget (otherwise pass 2 recomputes them).
  bool tiles_fit() const {
    const int64_t bytes_per_class = (x_.size(0) + x_.size(1)) * static_cast<int64_t>(sizeof(T));
    return p_.size(0) * bytes_per_class <= std::max(kSoftmaxReuseBytes, tile_ * bytes_per_class);
  }

  // Pass 1: merges every row's statistics over these proxies into `rows` (logit sums only when
  // `with_logit_sum`); returns the tiles when `keep`, else nothing.
  std::vector<Tile> row_pass(SoftmaxRows& rows, bool with_logit_sum, bool keep) {
    const int64_t B = x_.size(0), C = p_.size(0);
    const SoftmaxRowState state{rows.max.data_ptr<double>(), rows.sum.data_ptr<double>(),
                                with_logit_sum ? rows.logit_sum.data_ptr<double>() : nullptr,
                                rows.target.data_ptr<double>()};
    const at::Tensor partial_buffer =
        at::empty({3, blocks_for(tile_, chunk_cols_) * B}, acc_.dtype(at::kDouble));
    const SoftmaxChunkPartials partials{partial_buffer[0].data_ptr<double>(),
                                        partial_buffer[1].data_ptr<double>(),
                                        partial_buffer[2].data_ptr<double>()};
    std::vector<Tile> kept;
    for (int64_t first = 0; first < C; first += tile_) {
      const int64_t cols = std::min(tile_, C - first);
      const int64_t chunks = blocks_for(cols, chunk_cols_);
      Tile t = compute_tile(first, cols);
      if (keep) t.shift = at::empty({chunks * B}, acc_);
      checks_.add_norms(t.proxies.norm, /*embeddings=*/false);
      launch(x_, chunks * B, args(t, first, cols, state, partials));
      launch(x_, B, SoftmaxCombineArgs{partials, B, chunks, state});
      if (keep) kept.push_back(std::move(t));
    }
    return kept;
  }

  // Pass 2 from complete row statistics: the loss, and G = (scale / B)(softmax(z) - targets) tile
  // by tile (pass 1's `kept` tiles, or recomputed when empty) into dL/dx and dL/dp. Raises if a
  // value check failed.
  LossAndGrads loss_and_grads(const SoftmaxRows& rows, double smoothing,
                              const std::vector<Tile>& kept) const {
    const int64_t B = x_.size(0), C = p_.size(0);
    const at::Tensor loss = softmax_loss(rows, smoothing, num_classes_, acc_);
    const at::Tensor row_lse = (rows.max + at::log(rows.sum)).to(acc_.dtype());
    at::Tensor grad_x_acc = at::zeros({B, x_.size(1)}, acc_);
    at::Tensor grad_p = at::empty_like(p_, at::MemoryFormat::Contiguous);
    const double other_weight =
        num_classes_ > 1 ? smoothing / static_cast<double>(num_classes_ - 1) : 0.0;
    const SoftmaxRowState no_state{nullptr, nullptr, nullptr, nullptr};
    const SoftmaxChunkPartials no_partials{nullptr, nullptr, nullptr};
    for (int64_t first = 0, index = 0; first < C; first += tile_, ++index) {
      const int64_t cols = std::min(tile_, C - first);
      const Tile t = kept.empty() ? compute_tile(first, cols) : kept[index];
      launch(x_, blocks_for(cols, chunk_cols_) * B,
             SoftmaxGradArgs<T>{args(t, first, cols, no_state, no_partials),
                                row_lse.const_data_ptr<T>(), T(1.0 - smoothing), T(other_weight),
                                T(scale_ / static_cast<double>(B))});
      grad_x_acc.addmm_(t.sim, t.proxies.unit);
      project_rows(at::mm(t.sim.t(), xs_.unit), t.proxies, grad_p.narrow(0, first, cols));
    }
    at::Tensor grad_x = at::empty_like(x_, at::MemoryFormat::Contiguous);
    project_rows(grad_x_acc, xs_, grad_x);
    raise_if_failed();
    return {loss, grad_x, grad_p};
  }

  void raise_if_failed() const { checks_.raise_if_failed(x_, p_); }

 private:
  Tile compute_tile(int64_t first, int64_t cols) const {
    UnitRows ps = normalize_rows(p_.narrow(0, first, cols).to(acc_.dtype()));
    at::Tensor sim = similarity_tile(xs_.unit, ps.unit, column_contiguous_);
    return Tile{std::move(ps), std::move(sim), at::Tensor()};
  }

  SoftmaxTileArgs<T> args(const Tile& t, int64_t first, int64_t cols, const SoftmaxRowState& state,
                          const SoftmaxChunkPartials& partials) const {
    return SoftmaxTileArgs<T>{view_of<T>(t.sim), labels_.kernel.template const_data_ptr<int64_t>(),
                              x_.size(0), cols, chunk_cols_, first,
                              T(scale_), exclude_positive_, state, partials,
                              t.shift.defined() ? t.shift.template data_ptr<T>() : nullptr};
  }

  const at::Tensor& x_;
  const at::Tensor& p_;
  at::TensorOptions acc_;
  ValueChecks checks_;
  ShardLabels labels_;
  UnitRows xs_;
  int64_t num_classes_;
  double scale_;
  bool exclude_positive_;
  int64_t tile_;
  int64_t chunk_cols_;
  bool column_contiguous_;
};

template <typename T>
LossAndGrads proxy_softmax_impl(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                                double scale, double smoothing, bool exclude_positive) {
  const int64_t C = p.size(0);
  SoftmaxTiles<T> tiles(x, p, labels, ClassShard{0, C, C}, scale, exclude_positive, "proxy_nca_loss");
  SoftmaxRows rows = empty_softmax_rows(x);
  const auto kept = tiles.row_pass(rows, /*with_logit_sum=*/smoothing > 0, tiles.tiles_fit());
  return tiles.loss_and_grads(rows, smoothing, kept);
}

// Sharded pass 1: [4, B] float64 rows (max, sum of e^{z - max}, logit sum, target logit) over
// this shard's proxies, with max = -inf where the shard holds no denominator logit of the row.
template <typename T>
at::Tensor softmax_shard_stats_impl(const at::Tensor& x, const at::Tensor& p,
                                    const at::Tensor& labels, double scale, bool exclude_positive,
                                    const ClassShard& shard) {
  SoftmaxTiles<T> tiles(x, p, labels, shard, scale, exclude_positive, "proxy_nca_shard_row_stats");
  SoftmaxRows rows = empty_softmax_rows(x);
  tiles.row_pass(rows, /*with_logit_sum=*/true, /*keep=*/false);
  const at::Tensor max = at::where(rows.sum > 0, rows.max, -std::numeric_limits<double>::infinity());
  tiles.raise_if_failed();
  return at::stack({max, rows.sum, rows.logit_sum, rows.target});
}

// Sharded pass 2: the loss from the rows reduced over all shards, and this shard's gradients.
template <typename T>
LossAndGrads softmax_shard_grads_impl(const at::Tensor& x, const at::Tensor& p,
                                      const at::Tensor& labels, const at::Tensor& row_stats,
                                      double scale, double smoothing, bool exclude_positive,
                                      const ClassShard& shard) {
  const SoftmaxTiles<T> tiles(x, p, labels, shard, scale, exclude_positive,
                              "proxy_nca_shard_loss_and_grads");
  return tiles.loss_and_grads(SoftmaxRows{row_stats[0], row_stats[1], row_stats[2], row_stats[3]},
                              smoothing, {});
}

}  // namespace

LossAndGrads proxy_anchor_loss(const at::Tensor& embeddings, const at::Tensor& proxies,
                               const at::Tensor& labels, double margin, double alpha,
                               const std::optional<at::Tensor>& isa_class_params,
                               bool isa_filter_positives, int64_t class_offset,
                               int64_t num_classes) {
  check_metadata(embeddings, proxies, labels, "proxy_anchor_loss");
  const ClassShard shard = class_shard(proxies, class_offset, num_classes, "proxy_anchor_loss");
  TORCH_CHECK_VALUE(std::isfinite(margin), "proxy_anchor_loss: margin must be finite, got ",
                    margin);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0,
                    "proxy_anchor_loss: alpha must be a finite number > 0, got ", alpha);
  const at::Tensor isa = isa_class_params.value_or(at::Tensor());
  if (isa.defined()) {
    TORCH_CHECK_TYPE(at::isFloatingType(isa.scalar_type()),
                     "proxy_anchor_loss: isa_class_params must be a floating tensor, got ",
                     describe(isa));
    TORCH_CHECK_VALUE(isa.dim() == 2 && isa.size(0) == 4 && isa.size(1) == proxies.size(0),
                      "proxy_anchor_loss: isa_class_params must have shape (4, num_classes) = (4, ",
                      proxies.size(0), "), got ", describe(isa));
    TORCH_CHECK_VALUE(isa.device() == embeddings.device(),
                      "proxy_anchor_loss: isa_class_params must be on ", embeddings.device(),
                      ", got ", isa.device());
    TORCH_CHECK_VALUE(!shard.sharded(),
                      "proxy_anchor_loss: isa_class_params cannot be combined with a class shard "
                      "(Proxy-ISA's normalizers are sums over all classes' multipliers)");
  }
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return proxy_anchor_impl<decltype(zero)>(embeddings, proxies, labels, margin, alpha, isa,
                                             isa_filter_positives, shard);
  });
}

IdmlLossAndGrads idml_proxy_anchor_loss(const at::Tensor& embeddings,
                                        const at::Tensor& uncertainty, const at::Tensor& proxies,
                                        const at::Tensor& labels, double margin, double alpha,
                                        int64_t class_offset, int64_t num_classes) {
  const char* op = "idml_proxy_anchor_loss";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(proxies, class_offset, num_classes, op);
  TORCH_CHECK_VALUE(uncertainty.dim() == 2, op,
                    ": uncertainty must be 2-D (batch, uncertainty_dim), got a ",
                    describe(uncertainty));
  TORCH_CHECK_TYPE(at::isFloatingType(uncertainty.scalar_type()), op,
                   ": uncertainty must be float32, bfloat16, float16 or float64, got ",
                   describe(uncertainty));
  TORCH_CHECK_VALUE(uncertainty.size(0) == embeddings.size(0), op,
                    ": uncertainty must have one row per embedding: embeddings has ",
                    embeddings.size(0), " rows, uncertainty has ", uncertainty.size(0));
  TORCH_CHECK_VALUE(uncertainty.size(1) > 0, op, ": uncertainty has dimension 0");
  TORCH_CHECK_VALUE(uncertainty.device() == embeddings.device(), op,
                    ": uncertainty must be on the embeddings' device ", embeddings.device(),
                    ", got ", uncertainty.device());
  TORCH_CHECK_VALUE(std::isfinite(margin), op, ": margin must be finite, got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0, op,
                    ": alpha must be a finite number > 0, got ", alpha);
  const bool wide = has_float64(embeddings, proxies) || uncertainty.scalar_type() == at::kDouble;
  return run_accumulating(embeddings, wide, [&](auto zero) {
    return idml_impl<decltype(zero)>(embeddings, uncertainty, proxies, labels, margin, alpha, shard);
  });
}

namespace {

// The softmax family's hyperparameter checks, against the number of classes of all shards.
void check_softmax_params(double scale, double smoothing, bool exclude_positive,
                          int64_t num_classes, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op,
                    ": scale must be a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(smoothing >= 0 && smoothing < 1, op, ": smoothing must be in [0, 1), got ",
                    smoothing);
  TORCH_CHECK_VALUE(!(exclude_positive && smoothing > 0), op,
                    ": smoothing is defined for the softmax over all proxies; "
                    "use smoothing=0 with exclude_positive=True");
  TORCH_CHECK_VALUE(!(exclude_positive && num_classes < 2), op,
                    ": exclude_positive=True needs at least 2 proxies "
                    "(the denominator sums over the other classes), got ", num_classes);
  TORCH_CHECK_VALUE(!(smoothing > 0 && num_classes < 2), op,
                    ": label smoothing needs at least 2 proxies, got ", num_classes);
}

}  // namespace

LossAndGrads proxy_nca_loss(const at::Tensor& embeddings, const at::Tensor& proxies,
                            const at::Tensor& labels, double scale, double smoothing,
                            bool exclude_positive) {
  check_metadata(embeddings, proxies, labels, "proxy_nca_loss");
  check_softmax_params(scale, smoothing, exclude_positive, proxies.size(0), "proxy_nca_loss");
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return proxy_softmax_impl<decltype(zero)>(embeddings, proxies, labels, scale, smoothing,
                                              exclude_positive);
  });
}

at::Tensor proxy_nca_shard_row_stats(const at::Tensor& embeddings, const at::Tensor& proxies,
                                     const at::Tensor& labels, double scale,
                                     bool exclude_positive, int64_t class_offset,
                                     int64_t num_classes) {
  const char* op = "proxy_nca_shard_row_stats";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(proxies, class_offset, num_classes, op);
  check_softmax_params(scale, 0.0, exclude_positive, shard.total, op);
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return softmax_shard_stats_impl<decltype(zero)>(embeddings, proxies, labels, scale,
                                                    exclude_positive, shard);
  });
}

LossAndGrads proxy_nca_shard_loss_and_grads(const at::Tensor& embeddings,
                                            const at::Tensor& proxies, const at::Tensor& labels,
                                            const at::Tensor& row_stats, double scale,
                                            double smoothing, bool exclude_positive,
                                            int64_t class_offset, int64_t num_classes) {
  const char* op = "proxy_nca_shard_loss_and_grads";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(proxies, class_offset, num_classes, op);
  check_softmax_params(scale, smoothing, exclude_positive, shard.total, op);
  TORCH_CHECK_VALUE(row_stats.scalar_type() == at::kDouble && row_stats.dim() == 2 &&
                        row_stats.size(0) == 4 && row_stats.size(1) == embeddings.size(0) &&
                        row_stats.device() == embeddings.device(),
                    op, ": row_stats must be a float64 tensor of shape (4, ", embeddings.size(0),
                    ") on ", embeddings.device(), " (the reduced proxy_nca_shard_row_stats), got a ",
                    describe(row_stats));
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return softmax_shard_grads_impl<decltype(zero)>(embeddings, proxies, labels,
                                                    row_stats.contiguous(), scale, smoothing,
                                                    exclude_positive, shard);
  });
}

}  // namespace dmlfast
