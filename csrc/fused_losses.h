// The fused proxy-loss ops: loss and both gradients from one forward (docs/losses.md §7).
//
// Every op takes `value_checks` (0 off, 1 immediate, 2 deferred: see CheckMode in checks.h) and
// returns, after the loss and the gradients, its value-check flags (int32 [4]).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace dmlfast {

// (loss: scalar in the accumulation dtype (float64 if an input is float64, else float32),
//  dL/d embeddings: like embeddings, dL/d proxies: like proxies, value flags).
using LossAndGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Proxy-Anchor (docs/losses.md §1.1): mean over proxies with positives of LSE0(-alpha (S - margin))
// plus the sum over all C proxies of LSE0(alpha (S + margin)) over negatives, divided by C.
// With `isa_class_params` ([4, C]: s_bar, theta, w, easy-negative weight per class), Proxy-ISA
// (docs/losses.md §3.1, §7.4): multipliers M in the exponents and normalizers from their class
// means; `isa_filter_positives` switches the positive bands on.
//
// Class shards (the anchor ops, without ISA): `proxies` are classes [class_offset, class_offset +
// proxies.shape[0]) of `num_classes` (< 0: proxies.shape[0], unsharded), labels are global in
// [0, num_classes). The op returns this shard's share: its columns' terms over |P+| (all classes
// of the batch) and num_classes, their dL/d embeddings, and dL/d proxies; summed over the
// shards, loss and dL/d embeddings equal the unsharded op's (dmlfast/sharded.py).
LossAndGrads proxy_anchor_loss(const at::Tensor& embeddings, const at::Tensor& proxies, const at::Tensor& labels,
                               double margin, double alpha, const std::optional<at::Tensor>& isa_class_params,
                               bool isa_filter_positives, int64_t class_offset, int64_t num_classes,
                               int64_t value_checks);

// IDML (docs/losses.md §6): Proxy-Anchor on the introspective similarity S' = 1 - (1 - S) g with
// g = exp(-(||v_b||^2 + 4) / (5 ||x_b - p_c||^2)), `uncertainty` v of shape (batch, any dim).
// Returns (loss, dL/d embeddings, dL/d uncertainty, dL/d proxies, value flags).
using IdmlLossAndGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
IdmlLossAndGrads idml_proxy_anchor_loss(const at::Tensor& embeddings, const at::Tensor& uncertainty,
                                        const at::Tensor& proxies, const at::Tensor& labels, double margin,
                                        double alpha, int64_t class_offset, int64_t num_classes,
                                        int64_t value_checks);

// Softmax cross-entropy over class logits with label smoothing, or the classic ProxyNCA form with
// the target excluded from the denominator (docs/losses.md §2, §7.3). The proxies are K =
// `centers_per_class` adjacent rows per class; a class's similarity s is the cosine (K = 1), the max
// over its centers (`center_aggregation` 0, Sub-center ArcFace) or their softmax-weighted mean with
// weights softmax(center_gamma * cos) (1, SoftTriple); its logit is scale * s, and scale * f(s) for
// the target with f(s) = s (`margin_type` 0), s - margin (1, CosFace) or cos(acos(s) + margin)
// (2, ArcFace, margin in radians; docs/losses.md §9, §10).
LossAndGrads proxy_nca_loss(const at::Tensor& embeddings, const at::Tensor& proxies, const at::Tensor& labels,
                            double scale, double smoothing, bool exclude_positive, int64_t value_checks,
                            int64_t centers_per_class, int64_t center_aggregation, double center_gamma,
                            int64_t margin_type, double margin);

// The softmax family over class shards (class_offset, num_classes as for the anchor ops, in
// classes), in two ops with a reduction across shards in between. Pass 1: [4, batch] float64 rows
// (max, sum of e^{z - max} over this shard's denominator logits (max = -inf where there are none),
// sum of its logits, the target logit where the target is in this shard, else 0). Its value checks
// are 0 or 1 (pass 2 checks the same inputs).
at::Tensor proxy_nca_shard_row_stats(const at::Tensor& embeddings, const at::Tensor& proxies, const at::Tensor& labels,
                                     double scale, bool exclude_positive, int64_t class_offset, int64_t num_classes,
                                     int64_t value_checks, int64_t centers_per_class, int64_t center_aggregation,
                                     double center_gamma, int64_t margin_type, double margin);

// Pass 2, from `row_stats` reduced over all shards (max: the maximum; the sums: rescaled to it and
// summed): (the loss over all classes, this shard's share of dL/d embeddings, dL/d proxies, flags).
LossAndGrads proxy_nca_shard_loss_and_grads(const at::Tensor& embeddings, const at::Tensor& proxies,
                                            const at::Tensor& labels, const at::Tensor& row_stats, double scale,
                                            double smoothing, bool exclude_positive, int64_t class_offset,
                                            int64_t num_classes, int64_t value_checks, int64_t centers_per_class,
                                            int64_t center_aggregation, double center_gamma, int64_t margin_type,
                                            double margin);

}  // namespace dmlfast
