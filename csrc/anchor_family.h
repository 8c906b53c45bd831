// The anchor family's steps shared by Proxy-Anchor / Proxy-ISA (anchor_family.cpp) and IDML
// (idml.cpp): the sparse positive terms and the three epilogue kernels of a dense tile.
#pragma once

#include "tiles.h"

namespace dmlfast {

// What every anchor-family call sets up first: its inputs as the kernels read them, the plan, the
// value checks and the labels in this shard's class coordinates.
template <typename T>
struct AnchorCall {
  at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  at::TensorOptions acc_options;
  at::Tensor x, p, labels;
  int64_t B, D, C;
  TilePlan plan;
  ValueChecks checks;
  ShardLabels shard_label;

  AnchorCall(const at::Tensor& x_in, const at::Tensor& p_in, const at::Tensor& labels_in, const ClassShard& shard,
             CheckMode mode)
      : acc_options(x_in.options().dtype(acc)),
        x(kernel_embeddings(x_in, acc)),
        p(kernel_proxies(p_in, acc)),
        labels(labels_in.contiguous()),
        B(x.size(0)),
        D(x.size(1)),
        C(p.size(0)),
        plan(plan_tiles(x, C, acc, Family::kAnchor)),
        checks(x, mode),
        shard_label(shard_labels(labels, shard)) {}

  int32_t* flags() const { return checks.device_flags(); }
  const int64_t* label_ptr() const { return shard_label.kernel.const_data_ptr<int64_t>(); }
};

// Per-sample positive terms, rows of one [7, B] buffer (AnchorPositive, AnchorPositiveFinish).
template <typename T>
struct PositiveTerms {
  enum Row { kCosine, kProxyNorm, kClassLse, kIsFirst, kWeight, kClassMeanWeight, kGrad, kRows };
  at::Tensor buffer;
  int64_t batch;
  PositiveTerms(const at::TensorOptions& acc, int64_t batch)
      : buffer(at::empty({kRows, batch}, acc)), batch(batch) {}
  T* row(Row r) const { return data_as<T>(buffer) + r * batch; }
};

// From the positive pairs' similarities (row kCosine, filled by the caller's kernel): each
// class's l+, W+, g_b (row kGrad) and the positives' part of the loss into `positive_loss`.
template <typename T>
void anchor_positive_terms(const at::Tensor& on, const PositiveTerms<T>& terms, const int64_t* labels,
                           int64_t local_classes, double margin, double alpha, const IsaClassParams<T>& isa,
                           T* positive_loss) {
  using R = typename PositiveTerms<T>::Row;
  const int64_t B = terms.batch;
  launch(on, B,
         AnchorPositive<T>{terms.row(R::kCosine), labels, B, T(alpha), T(margin), isa, terms.row(R::kClassLse),
                           terms.row(R::kIsFirst), terms.row(R::kWeight), terms.row(R::kClassMeanWeight)});
  launch(on, B,
         AnchorPositiveFinish<T>{terms.row(R::kCosine), terms.row(R::kClassLse), terms.row(R::kIsFirst),
                                 terms.row(R::kWeight), terms.row(R::kClassMeanWeight), labels, B, local_classes,
                                 T(alpha), T(margin), terms.row(R::kGrad), positive_loss});
}

// The workspace of the dense negatives' epilogue: AnchorPartials (5 arrays) and group scales,
// each [groups * tile].
struct AnchorNegativeSpace {
  at::Tensor partials, group_scale;
  int64_t stride;
  AnchorNegativeSpace(const TilePlan& plan, const at::TensorOptions& acc)
      : partials(at::empty({5 * plan.groups * plan.tile_columns}, acc)),
        group_scale(at::empty({plan.groups * plan.tile_columns}, acc)),
        stride(plan.groups * plan.tile_columns) {}
};

// The negatives of one tile: AnchorPartial, AnchorMerge, AnchorApply, G' into `out` (with
// tile.inv_norm null, as IDML: G = dL/dS' and no kappa). Writes l_c and the mean M of the tile's
// columns into column_lse / column_mean_weight (offset to the tile's first column).
template <typename T, typename O>
void anchor_negative_tile(const at::Tensor& on, const TilePlan& plan, const AnchorNegativeSpace& space,
                          const AnchorTile<T>& tile, const TileView<O>& out, T neg_scale, T* column_lse,
                          T* column_mean_weight, T* kappa) {
  T* base = data_as<T>(space.partials);
  const AnchorPartials<T> partials{base, base + space.stride, base + 2 * space.stride, base + 3 * space.stride,
                                   base + 4 * space.stride};
  const int64_t threads = plan.groups * tile.cols;
  T* group_scale = data_as<T>(space.group_scale);
  launch(on, threads, AnchorPartial<T>{tile, partials});
  launch(on, tile.cols,
         AnchorMerge<T>{partials, plan.groups, tile.cols, tile.inv_norm, neg_scale, column_lse, column_mean_weight,
                        group_scale, kappa});
  launch(on, threads,
         AnchorApply<T, O>{tile.sim, out, tile.rows, tile.cols, tile.rows_per_group, group_scale});
}

// l_c and mean M summed over all columns ([2, C] -> [2]), then AnchorLoss: the loss and the
// negatives' normalizer (C, or W- for ISA) into `scalars` [1].
template <typename T>
void anchor_loss(const at::Tensor& on, const at::Tensor& column_stats, bool isa, int64_t num_classes,
                 const T* positive_loss, const at::Tensor& loss, T* neg_normalizer) {
  const at::Tensor sums = column_stats.sum(1);
  launch(on, 1,
         AnchorLoss<T>{positive_loss, const_data_as<T>(sums), isa, T(static_cast<double>(num_classes)),
                       data_as<T>(loss), neg_normalizer});
}

}  // namespace dmlfast
