// IDML (docs/losses.md §6, §7.5): Proxy-Anchor on the introspective similarity S'.
//
// The positive pairs go through the anchor family's sparse positive terms on S'_{b, y_b}. Per
// tile of proxies: one raw GEMM R = X P^T, S' written into a tile (IdmlPairs), the anchor
// family's negative kernels on it, then IdmlChain, which folds dL/dS' (its positive entries from
// the sparse terms) into H, so dX += H P and dP = H^T X + diag(col_coef) P: the same three GEMMs
// as Proxy-Anchor.
#include <ATen/ATen.h>

#include "anchor_family.h"
#include "fused_losses.h"

namespace dmlfast {
namespace {

template <typename T>
IdmlLossAndGrads idml_impl(const at::Tensor& x_in, const at::Tensor& v, const at::Tensor& p_in,
                           const at::Tensor& labels_in, double margin, double alpha, const ClassShard& shard,
                           CheckMode mode) {
  const AnchorCall<T> call(x_in, p_in, labels_in, shard, mode);
  const auto& [acc, acc_options, x, p, labels, B, D, C, plan, checks, shard_label] = call;
  int32_t* flags = call.flags();
  const int64_t* label_ptr = call.label_ptr();
  const IsaClassParams<T> plain{nullptr, nullptr, nullptr, nullptr, false};

  const Embeddings emb = embedding_rows(plan, x, labels, shard.total, acc, /*raw=*/true, flags);
  const at::Tensor x_acc = x.to(acc);
  const at::Tensor inv_x_norm = emb.norm.reciprocal();
  const at::Tensor va = v.to(acc).contiguous();
  const at::Tensor uncertainty = va.square().sum(1);

  // Positive pairs, sparse: S'_{b, y_b}, then Proxy-Anchor's positive terms on it.
  at::Tensor loss = at::empty({}, acc_options);
  const at::Tensor scalars = at::empty({2}, acc_options);
  const PositiveTerms<T> terms(acc_options, B);
  using R = typename PositiveTerms<T>::Row;
  launch(x, B,
         IdmlPositive<T>{const_data_as<T>(x_acc), const_data_as<T>(p), label_ptr, B, D, shard.local,
                            const_data_as<T>(emb.sq), const_data_as<T>(emb.norm), const_data_as<T>(uncertainty),
                            terms.row(R::kCosine), flags});
  anchor_positive_terms<T>(x, terms, label_ptr, shard.local, margin, alpha, plain, data_as<T>(scalars));

  // All pairs, dense, tile by tile.
  const int64_t tile_cap = plan.tile_columns;
  const at::Tensor grad_x = at::zeros({B, D}, acc_options);
  const at::Tensor x_coef = at::zeros({B}, acc_options), grad_uncertainty_sq = at::zeros({B}, acc_options);
  at::Tensor grad_p = at::empty_like(p);
  const at::Tensor column_stats = at::empty({2, C}, acc_options);
  const ProxyTileSpace proxy_space(plan, p, acc);
  const AnchorNegativeSpace negative_space(plan, acc_options);
  const at::Tensor dot_buffer = at::empty({B * tile_cap}, acc_options);
  const at::Tensor sim_buffer = at::empty({B * tile_cap}, acc_options);
  const at::Tensor gate_buffer = at::empty({B * tile_cap}, acc_options);  // g, then E (IdmlChain)
  const at::Tensor uncert_buffer = at::empty({B * tile_cap}, acc_options);
  const at::Tensor col_partial = at::empty({plan.groups * tile_cap}, acc_options);
  const at::Tensor ones = at::ones({tile_cap}, acc_options);
  const bool low_precision = plan.gemm_dtype != acc;
  const at::Tensor h_buffer =
      low_precision ? at::empty({B * tile_cap}, x.options().dtype(plan.gemm_dtype)) : dot_buffer;
  const at::Tensor scratch = low_precision ? at::empty({B, D}, acc_options) : at::Tensor();
  const T neg_scale = T(alpha / static_cast<double>(shard.total));
  const bool cm = plan.column_major;
  for (int64_t first = 0; first < C; first += tile_cap) {
    const int64_t cols = std::min(tile_cap, C - first);
    const ProxyTile pt = proxy_tile(proxy_space, p, first, cols, acc, flags);
    const at::Tensor dot = tile_in(dot_buffer, B, cols, cm), sim = tile_in(sim_buffer, B, cols, cm);
    const at::Tensor gate = tile_in(gate_buffer, B, cols, cm), by_uncert = tile_in(uncert_buffer, B, cols, cm);
    if (cm) {
      gemm(plan, pt.gemm, emb.gemm.t(), dot.t(), false, scratch);
    } else {
      gemm(plan, emb.gemm, pt.gemm.t(), dot, false, scratch);
    }
    const IdmlTile<T> tile{view_of<T>(dot), view_of<T>(sim), view_of<T>(gate), label_ptr, B, cols,
                           plan.rows_per_group, first, const_data_as<T>(emb.sq), const_data_as<T>(inv_x_norm),
                           const_data_as<T>(uncertainty), const_data_as<T>(pt.norm)};
    launch(x, plan.groups * cols, IdmlPairs<T>{tile});
    const AnchorTile<T> negatives{view_of<T>(sim), label_ptr, B, cols, plan.rows_per_group, first, nullptr,
                                  T(alpha), T(margin), plain};
    anchor_negative_tile<T, T>(x, plan, negative_space, negatives, view_of<T>(sim), neg_scale,
                               data_as<T>(column_stats) + first, data_as<T>(column_stats) + C + first, nullptr);
    const at::Tensor h = tile_in(h_buffer, B, cols, cm);
    with_tile_type<T>(plan.gemm_dtype, [&](auto tile_zero) {
      using O = decltype(tile_zero);
      launch(x, plan.groups * cols,
             IdmlChain<T, O>{tile, terms.row(R::kGrad), view_of<O>(h), view_of<T>(gate), view_of<T>(by_uncert),
                             data_as<T>(col_partial)});
    });
    launch(x, cols, ColumnSum<T>{const_data_as<T>(col_partial), plan.groups, cols, nullptr, data_as<T>(pt.kappa)});
    const at::Tensor ones_cols = ones.narrow(0, 0, cols);
    x_coef.addmv_(gate, ones_cols);
    grad_uncertainty_sq.addmv_(by_uncert, ones_cols);
    gemm(plan, h, pt.gemm, grad_x, /*accumulate=*/true, scratch);
    proxy_gradient(plan, proxy_space, pt, h.t(), emb.gemm, grad_p);
  }
  anchor_loss<T>(x, column_stats, /*isa=*/false, shard.total, const_data_as<T>(scalars), loss, data_as<T>(scalars) + 1);
  const at::Tensor grad_embeddings = grad_x.addcmul_(x_acc, x_coef.unsqueeze(1)).to(x_in.scalar_type());
  const at::Tensor grad_v = va.mul(grad_uncertainty_sq.mul_(2).unsqueeze(1)).to(v.scalar_type());
  const at::Tensor value_flags = checks.finish({"idml_proxy_anchor_loss", x_in, p_in, labels_in, v, shard.total});
  return {loss, grad_embeddings, grad_v, grad_p.to(p_in.scalar_type()), value_flags};
}

}  // namespace

IdmlLossAndGrads idml_proxy_anchor_loss(const at::Tensor& embeddings, const at::Tensor& uncertainty,
                                        const at::Tensor& proxies, const at::Tensor& labels, double margin,
                                        double alpha, int64_t class_offset, int64_t num_classes,
                                        int64_t value_checks) {
  const char* op = "idml_proxy_anchor_loss";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(proxies.size(0), class_offset, num_classes, op);
  const CheckMode mode = check_mode(value_checks, op);
  TORCH_CHECK_VALUE(uncertainty.dim() == 2, op, ": uncertainty must be 2-D (batch, uncertainty_dim), got a ",
                    describe(uncertainty));
  TORCH_CHECK_TYPE(at::isFloatingType(uncertainty.scalar_type()), op,
                   ": uncertainty must be float32, bfloat16, float16 or float64, got ", describe(uncertainty));
  TORCH_CHECK_VALUE(uncertainty.size(0) == embeddings.size(0), op,
                    ": uncertainty must have one row per embedding: embeddings has ", embeddings.size(0),
                    " rows, uncertainty has ", uncertainty.size(0));
  TORCH_CHECK_VALUE(uncertainty.size(1) > 0, op, ": uncertainty has dimension 0");
  TORCH_CHECK_VALUE(uncertainty.device() == embeddings.device(), op,
                    ": uncertainty must be on the embeddings' device ", embeddings.device(), ", got ",
                    uncertainty.device());
  TORCH_CHECK_VALUE(std::isfinite(margin), op, ": margin must be finite, got ", margin);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha > 0, op, ": alpha must be a finite number > 0, got ", alpha);
  const bool wide = has_float64(embeddings, proxies) || uncertainty.scalar_type() == at::kDouble;
  return run_accumulating(embeddings, wide, [&](auto zero) {
    return idml_impl<decltype(zero)>(embeddings, uncertainty, proxies, labels, margin, alpha, shard, mode);
  });
}

}  // namespace dmlfast
