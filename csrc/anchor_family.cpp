// Proxy-Anchor and Proxy-ISA (docs/losses.md §1.1, §3, §7.2, §7.4): the positive pairs sparse, one
// similarity per sample; the negatives dense, tile by tile (csrc/tiles.h).
#include <ATen/ATen.h>

#include "anchor_family.h"
#include "fused_losses.h"

namespace dmlfast {
namespace {

// Embedding components per positive-scatter thread: one on the GPU (neighbouring threads,
// neighbouring components); 128 contiguous ones on the CPU.
constexpr int64_t kScatterChunkCuda = 1, kScatterChunkCpu = 128;

template <typename T>
IsaClassParams<T> isa_view(const at::Tensor& isa, bool filter_positives) {
  if (!isa.defined()) return {nullptr, nullptr, nullptr, nullptr, false};
  const T* base = const_data_as<T>(isa);
  const int64_t C = isa.size(1);
  return {base, base + C, base + 2 * C, base + 3 * C, filter_positives};
}

// With ISA the negatives' normalizer W- (the sum of the columns' mean M) is known only after the
// last tile, so the negatives run with dL/dl_c = alpha and their gradients are divided by W-
// before the positives' are added.
template <typename T>
LossAndGrads proxy_anchor_impl(const at::Tensor& x_in, const at::Tensor& p_in, const at::Tensor& labels_in,
                               double margin, double alpha, const at::Tensor& isa_params, bool filter_positives,
                               const ClassShard& shard, CheckMode mode) {
  const AnchorCall<T> call(x_in, p_in, labels_in, shard, mode);
  const auto& [acc, acc_options, x, p, labels, B, D, C, plan, checks, shard_label] = call;
  int32_t* flags = call.flags();
  const int64_t* label_ptr = call.label_ptr();
  const bool is_isa = isa_params.defined();
  const at::Tensor isa = is_isa ? isa_params.to(acc).contiguous() : at::Tensor();
  const IsaClassParams<T> isa_params_view = isa_view<T>(isa, filter_positives);
  const Embeddings emb = embedding_rows(plan, x, labels, shard.total, acc, /*raw=*/false, flags);

  // Positive pairs, sparse: s_b, then l+, W+ and g_b.
  at::Tensor loss = at::empty({}, acc_options);
  const at::Tensor scalars = at::empty({2}, acc_options);  // the positives' loss, the negatives' normalizer
  const PositiveTerms<T> terms(acc_options, B);
  using R = typename PositiveTerms<T>::Row;
  launch(x, B,
         PositivePairs<T>{const_data_as<T>(emb.unit), const_data_as<T>(p), label_ptr, B, D, shard.local,
                             terms.row(R::kCosine), terms.row(R::kProxyNorm)});
  anchor_positive_terms<T>(x, terms, label_ptr, shard.local, margin, alpha, isa_params_view, data_as<T>(scalars));

  // Negative pairs, dense, tile by tile: S, G', dX_hat += G' P, dP = G'^T X_hat - kappa P.
  const at::Tensor grad_unit = at::zeros({B, D}, acc_options);
  at::Tensor grad_p = at::empty_like(p);
  const at::Tensor column_stats = at::empty({2, C}, acc_options);  // l_c, mean M
  const ProxyTileSpace proxy_space(plan, p, acc);
  const AnchorNegativeSpace negative_space(plan, acc_options);
  const at::Tensor sim_buffer = at::empty({B * plan.tile_columns}, acc_options);
  const bool low_precision = plan.gemm_dtype != acc;
  const at::Tensor grad_buffer =
      low_precision ? at::empty({B * plan.tile_columns}, x.options().dtype(plan.gemm_dtype)) : sim_buffer;
  const at::Tensor scratch = low_precision ? at::empty({B, D}, acc_options) : at::Tensor();
  const T neg_scale = T(is_isa ? alpha : alpha / static_cast<double>(shard.total));
  for (int64_t first = 0; first < C; first += plan.tile_columns) {
    const int64_t cols = std::min(plan.tile_columns, C - first);
    const ProxyTile pt = proxy_tile(proxy_space, p, first, cols, acc, flags);
    const at::Tensor sim = tile_in(sim_buffer, B, cols, plan.column_major);
    if (plan.column_major) {
      gemm(plan, pt.gemm, emb.gemm.t(), sim.t(), false, scratch);
    } else {
      gemm(plan, emb.gemm, pt.gemm.t(), sim, false, scratch);
    }
    const AnchorTile<T> tile{view_of<T>(sim), label_ptr, B, cols, plan.rows_per_group, first,
                             const_data_as<T>(pt.inv_norm), T(alpha), T(margin), isa_params_view};
    const at::Tensor grad_tile = tile_in(grad_buffer, B, cols, plan.column_major);
    with_tile_type<T>(plan.gemm_dtype, [&](auto tile_zero) {
      using O = decltype(tile_zero);
      anchor_negative_tile<T, O>(x, plan, negative_space, tile, view_of<O>(grad_tile), neg_scale,
                                 data_as<T>(column_stats) + first, data_as<T>(column_stats) + C + first,
                                 data_as<T>(pt.kappa));
    });
    gemm(plan, grad_tile, pt.gemm, grad_unit, /*accumulate=*/true, scratch);
    proxy_gradient(plan, proxy_space, pt, grad_tile.t(), emb.gemm, grad_p);
  }
  T* neg_normalizer = data_as<T>(scalars) + 1;
  anchor_loss<T>(x, column_stats, is_isa, shard.total, const_data_as<T>(scalars), loss, neg_normalizer);
  if (is_isa) {
    const at::Tensor normalizer = scalars.narrow(0, 1, 1);
    grad_unit.div_(normalizer);
    grad_p.div_(normalizer);
  }

  // The positive pairs' gradients: into dX_hat, and one row per class into dP.
  const at::Tensor class_grad = at::empty({B, D}, acc_options);
  const int64_t chunk = x.is_cuda() ? kScatterChunkCuda : kScatterChunkCpu;
  launch(x, B * blocks_for(D, chunk),
         PositiveScatter<T>{terms.row(R::kGrad), terms.row(R::kCosine), terms.row(R::kProxyNorm),
                               const_data_as<T>(emb.unit), const_data_as<T>(p), label_ptr, B, D, chunk,
                               shard.local, data_as<T>(grad_unit), data_as<T>(class_grad)});
  grad_p.index_add_(0, shard_label.row, class_grad);
  const at::Tensor grad_x = embeddings_backward(grad_unit, emb, x_in);
  const at::Tensor value_flags = checks.finish({"proxy_anchor_loss", x_in, p_in, labels_in, at::Tensor(), shard.total});
  return {loss, grad_x, grad_p.to(p_in.scalar_type()), value_flags};
}

}  // namespace

LossAndGrads proxy_anchor_loss(const at::Tensor& embeddings, const at::Tensor& proxies, const at::Tensor& labels,
                               double margin, double alpha, const std::optional<at::Tensor>& isa_class_params,
                               bool isa_filter_positives, int64_t class_offset, int64_t num_classes,
                               int64_t value_checks) {
  const char* op = "proxy_anchor_loss";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(proxies.size(0), class_offset, num_classes, op);
  const CheckMode mode = check_mode(value_checks, op);
  TORCH_CHECK_VALUE(std::isfinite(margin), op, ": margin must be finite, got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0, op, ": alpha must be a finite number > 0, got ", alpha);
  const at::Tensor isa = isa_class_params.value_or(at::Tensor());
  if (isa.defined()) {
    TORCH_CHECK_TYPE(at::isFloatingType(isa.scalar_type()), op, ": isa_class_params must be a floating tensor, got ",
                     describe(isa));
    TORCH_CHECK_VALUE(isa.dim() == 2 && isa.size(0) == 4 && isa.size(1) == proxies.size(0), op,
                      ": isa_class_params must have shape (4, num_classes) = (4, ", proxies.size(0), "), got ",
                      describe(isa));
    TORCH_CHECK_VALUE(isa.device() == embeddings.device(), op, ": isa_class_params must be on ", embeddings.device(),
                      ", got ", isa.device());
    TORCH_CHECK_VALUE(!shard.sharded(), op,
                      ": isa_class_params cannot be combined with a class shard "
                      "(Proxy-ISA's normalizers are sums over all classes' multipliers)");
  }
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return proxy_anchor_impl<decltype(zero)>(embeddings, proxies, labels, margin, alpha, isa, isa_filter_positives,
                                             shard, mode);
  });
}

}  // namespace dmlfast
