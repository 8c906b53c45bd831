// Softmax family: ProxyNCA, ProxyNCA++, Norm-SoftMax (docs/losses.md §2, §7.3), and with K centers
// per class and a margin on the target, CosFace, ArcFace, Sub-center ArcFace (§9) and SoftTriple
// (§10): the same passes over classes whose logit comes from their K adjacent proxy rows.
//
// Two passes over tiles of proxies: pass 1 reduces each row's log-sum-exp (SoftmaxSlices, then
// a fixed-order merge tree, then SoftmaxRowUpdate), logit sum and target logit; pass 2 writes G'
// tile by tile from the row LSE (SoftmaxGrad) and runs the GEMMs. Unsharded, one call runs both,
// reusing as many of pass 1's tiles of S as the plan's budget holds and, where the plan says so (the
// CPU), their e^{z - shift}, so that pass 2 multiplies by e^{shift - lse} instead of exponentiating
// again (an exponential costs the CPU more than reading the kept value; the GPU recomputes it). Sharded
// across processes, each pass is its own op, so that the row statistics can be reduced across
// shards in between (a distributed log-sum-exp, as in class-sharded softmax training).
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fused_losses.h"
#include "tiles.h"

namespace dmlfast {
namespace {

// Per-row statistics of pass 1, rows of one [4, B] float64 buffer: the denominator's running max
// and sum of e^{z - max} (sum 0 while no logit entered), the sum of all logits z_bc and the target
// logit z_{b, y_b} (0 where the target is not among these proxies).
struct SoftmaxRows {
  at::Tensor stats;  // [4, B] float64
  SoftmaxRowState state(bool with_logit_sum) const {
    double* base = stats.data_ptr<double>();
    const int64_t B = stats.size(1);
    return {base, base + B, with_logit_sum ? base + 2 * B : nullptr, base + 3 * B};
  }
};

// The softmax family's logits as the op's arguments give them (docs/losses.md §2, §9, §10).
struct SoftmaxLogits {
  double scale;
  bool exclude_positive;
  int64_t centers;          // K proxy rows per class
  int aggregation;          // CenterAggregation
  double center_gamma;
  int margin_type;          // MarginType
  double margin;

  template <typename T>
  ClassLogit<T> class_logit() const {
    const bool arc = margin_type == kArcFaceMargin;
    return {centers, aggregation, T(center_gamma), margin_type, T(margin), T(arc ? std::cos(margin) : 1.0),
            T(arc ? std::sin(margin) : 0.0), T(arc ? std::cos(M_PI - margin) : -1.0)};
  }
};

// The tile plan with whole classes per tile: tiles never split a class's K rows.
TilePlan softmax_plan(const at::Tensor& x, int64_t proxy_rows, at::ScalarType acc, int64_t centers) {
  TilePlan plan = plan_tiles(x, proxy_rows, acc, Family::kSoftmax);
  plan.tile_columns = std::max(centers, plan.tile_columns / centers * centers);
  return plan;
}

// Which of pass 1's tiles pass 2 reuses: the first `tiles` tiles of S, with their exponentials or
// not (pass 2 recomputes what is not kept; reuse() keeps exponentials only with every tile).
struct Reuse {
  int64_t tiles = 0;
  bool exponentials = false;
};

// Pass 1's first `count` tiles of S kept for pass 2 (which recomputes the others) and, where the
// reuse says so, each kept tile's e^{z - shift} per class and its (row, slice) shifts.
struct KeptTiles {
  int64_t count = 0;
  at::Tensor sims;    // [count * B * tile_columns], or undefined
  at::Tensor exps;    // [count * B * tile classes], or undefined
  at::Tensor shifts;  // [count * B * max slices], or undefined
};

SoftmaxRows empty_softmax_rows(const at::Tensor& x) {
  return {at::zeros({4, x.size(0)}, x.options().dtype(at::kDouble))};
}

// One softmax-family call: its checked inputs, how its proxies are tiled, and the two passes.
template <typename T>
class SoftmaxTiles {
 public:
  SoftmaxTiles(const at::Tensor& x_in, const at::Tensor& p_in, const at::Tensor& labels_in, const ClassShard& shard,
               const SoftmaxLogits& logits, CheckMode mode, const char* op)
      : op_(op),
        x_in_(x_in),
        p_in_(p_in),
        labels_in_(labels_in),
        acc_(c10::CppTypeToScalarType<T>::value),
        acc_options_(x_in.options().dtype(acc_)),
        x_(kernel_embeddings(x_in, acc_)),
        p_(kernel_proxies(p_in, acc_)),
        labels_(labels_in.contiguous()),
        plan_(softmax_plan(x_, p_.size(0), acc_, logits.centers)),
        checks_(x_, mode),
        shard_label_(shard_labels(labels_, shard)),
        shard_(shard),
        emb_(embedding_rows(plan_, x_, labels_, shard.total, acc_, /*raw=*/false, checks_.device_flags())),
        proxy_space_(plan_, p_, acc_),
        logits_(logits) {}

  int64_t batch() const { return x_.size(0); }
  int64_t rows_of_proxies() const { return p_.size(0); }
  int64_t tiles() const { return blocks_for(rows_of_proxies(), plan_.tile_columns); }

  // What pass 2 reuses of pass 1: every tile of S, with its exponentials where the plan keeps
  // them, when that fits the plan's reuse budget (or is one tile); else the first tiles of S alone
  // that the budget holds. A tile of S costs a GEMM to recompute, its exponentials one run through
  // exp_run, so under the budget the bytes go to S.
  Reuse reuse() const {
    const int64_t centers = logits_.centers, C = rows_of_proxies(), tile = plan_.tile_columns;
    const int64_t per_row = plan_.keep_exponentials ? C + C / centers : C;
    const int64_t per_tile = plan_.keep_exponentials ? tile + tile / centers : tile;
    const int64_t bytes = batch() * static_cast<int64_t>(sizeof(T));
    if (per_row * bytes <= std::max(plan_.reuse_bytes, per_tile * bytes)) return {tiles(), plan_.keep_exponentials};
    return {std::min(tiles(), plan_.reuse_bytes / (tile * bytes)), false};
  }

  // Pass 1: merges every row's statistics over these proxies into `rows` (logit sums only when
  // `with_logit_sum`). What `reuse` names stays for pass 2.
  KeptTiles row_pass(const SoftmaxRows& rows, bool with_logit_sum, const Reuse& reuse) {
    const int64_t B = batch(), C = rows_of_proxies(), tile = plan_.tile_columns;
    const int64_t max_slices = slices_of(tile), tile_classes = tile / logits_.centers;
    const int64_t keep = reuse.tiles;
    KeptTiles kept;
    kept.count = keep;
    if (keep > 0) kept.sims = at::empty({keep * B * tile}, acc_options_);
    if (keep > 0 && reuse.exponentials) {
      kept.exps = at::empty({keep * B * tile_classes}, acc_options_);
      kept.shifts = at::empty({keep * B * max_slices}, acc_options_);
    }
    const bool recomputed = keep < tiles();
    const at::Tensor scratch_sims = recomputed ? at::empty({B * tile}, acc_options_) : at::Tensor();
    // Where the plan keeps exponentials but this call keeps none, pass 1 leaves them anyway (the walks
    // that do are the faster ones on the CPU): in each tile itself when no tile is kept and a class
    // has one center (pass 1's own to overwrite), else in a scratch buffer.
    const bool leave_exps = plan_.keep_exponentials && !reuse.exponentials;
    const bool exps_in_tile = leave_exps && keep == 0 && logits_.centers == 1;
    const at::Tensor exp_scratch =
        leave_exps && !exps_in_tile ? at::empty({B * tile_classes}, acc_options_) : at::Tensor();
    const at::Tensor shift_scratch = leave_exps ? at::empty({B * max_slices}, acc_options_) : at::Tensor();
    // Partials of the merge tree's levels, ping-ponged between two buffers of 3 arrays each.
    const at::Tensor level_max = at::empty({2, B * max_slices}, acc_options_);
    const at::Tensor level_sums = at::empty({2, 2, B * max_slices}, acc_options_.dtype(at::kDouble));
    auto partials = [&](int level) {
      return SoftmaxPartials<T>{data_as<T>(level_max[level]), level_sums[level][0].data_ptr<double>(),
                                level_sums[level][1].data_ptr<double>()};
    };
    const SoftmaxRowState state = rows.state(with_logit_sum);
    for (int64_t first = 0, index = 0; first < C; first += tile, ++index) {
      const int64_t cols = std::min(tile, C - first);
      const ProxyTile pt = proxy_tile(proxy_space_, p_, first, cols, acc_, checks_.device_flags());
      const bool kept_tile = index < keep;
      const at::Tensor sim = kept_tile ? similarity(kept.sims, index, pt) : similarity(scratch_sims, 0, pt);
      const int64_t slices = slices_of(cols);
      int level = 0;
      T* exps = nullptr;
      T* shifts = nullptr;
      if (kept_tile && kept.exps.defined()) {
        exps = data_as<T>(kept.exps) + index * B * tile_classes;
        shifts = data_as<T>(kept.shifts) + index * B * max_slices;
      } else if (leave_exps) {
        exps = exps_in_tile ? data_as<T>(sim) : data_as<T>(exp_scratch);
        shifts = data_as<T>(shift_scratch);
      }
      launch(x_, B * slices,
             SoftmaxSlices<T>{tile_args(sim, pt), slices, with_logit_sum, partials(level), state.target_logit, exps,
                              shifts});
      int64_t count = slices;
      while (count > plan_.merge_fan_in) {
        const int64_t next = blocks_for(count, plan_.merge_fan_in);
        launch(x_, B * next, SoftmaxMerge<T>{partials(level), B, count, plan_.merge_fan_in, partials(1 - level)});
        level = 1 - level;
        count = next;
      }
      launch(x_, B, SoftmaxRowUpdate<T>{partials(level), B, count, state});
    }
    return kept;
  }

  // Pass 2 from complete row statistics: the loss, and G' tile by tile (from pass 1's `kept`
  // tiles, or recomputed when they are undefined) into dL/dx and dL/dp.
  LossAndGrads loss_and_grads(const SoftmaxRows& rows, double smoothing, const KeptTiles& kept) {
    const int64_t B = batch(), D = x_.size(1), C = rows_of_proxies(), tile = plan_.tile_columns;
    const int64_t max_slices = slices_of(tile), tile_classes = tile / logits_.centers;
    const int64_t total = shard_.total;
    const double other_weight = total > 1 ? smoothing / static_cast<double>(total - 1) : 0.0;
    const double* stats = rows.stats.const_data_ptr<double>();
    at::Tensor loss = at::empty({}, acc_options_);
    const at::Tensor row_lse = at::empty({B}, acc_options_);
    launch(x_, B,
           SoftmaxLoss<T>{stats, stats + B, smoothing > 0 ? stats + 2 * B : nullptr, stats + 3 * B, B,
                          1.0 - smoothing, other_weight, data_as<T>(row_lse), data_as<T>(loss)});
    const at::Tensor grad_unit = at::zeros({B, D}, acc_options_);
    at::Tensor grad_p = at::empty_like(p_);
    const at::Tensor scratch_sims = kept.count < tiles() ? at::empty({B * tile}, acc_options_) : at::Tensor();
    const bool low_precision = plan_.gemm_dtype != acc_;  // G' goes over S unless the GEMMs read another dtype
    const at::Tensor grad_buffer = low_precision ? at::empty({B * tile}, x_.options().dtype(plan_.gemm_dtype)) : at::Tensor();
    const at::Tensor scratch = low_precision ? at::empty({B, D}, acc_options_) : at::Tensor();
    const at::Tensor cos_partial = at::empty({plan_.groups * tile}, acc_options_);
    for (int64_t first = 0, index = 0; first < C; first += tile, ++index) {
      const int64_t cols = std::min(tile, C - first);
      const ProxyTile pt = proxy_tile(proxy_space_, p_, first, cols, acc_, checks_.device_flags());
      const bool kept_tile = index < kept.count;
      const at::Tensor sim = kept_tile ? prefix(kept.sims.narrow(0, index * B * tile, B * cols), B, cols)
                                       : similarity(scratch_sims, 0, pt);
      const int64_t slices = slices_of(cols);
      const bool kept_exps = kept_tile && kept.exps.defined();
      const T* exps = kept_exps ? const_data_as<T>(kept.exps) + index * B * tile_classes : nullptr;
      T* exp_scales = kept_exps ? data_as<T>(kept.shifts) + index * B * max_slices : nullptr;
      if (exp_scales != nullptr) launch(x_, B * slices, SoftmaxExpScales<T>{exp_scales, B, slices, const_data_as<T>(row_lse)});
      const at::Tensor grad_tile = low_precision ? prefix(grad_buffer, B, cols) : sim;
      with_tile_type<T>(plan_.gemm_dtype, [&](auto tile_zero) {
        using O = decltype(tile_zero);
        const SoftmaxGradTile<T, O> grads{tile_args(sim, pt),
                                          plan_.rows_per_group,
                                          const_data_as<T>(row_lse),
                                          T(1.0 - smoothing),
                                          T(other_weight),
                                          T(logits_.scale / static_cast<double>(B)),
                                          row_major_view_of<O>(grad_tile),
                                          data_as<T>(cos_partial),
                                          exps,
                                          exp_scales,
                                          slices};
        const int64_t classes = cols / logits_.centers;
        if (plan_.classes_per_thread == 1) {
          launch(x_, plan_.groups * classes, SoftmaxGrad<T, O>{grads});
        } else {
          const int64_t runs = blocks_for(classes, plan_.classes_per_thread);
          launch(x_, plan_.groups * runs, SoftmaxGradRuns<T, O>{grads, plan_.classes_per_thread});
        }
      });
      launch(x_, cols,
             ColumnSum<T>{const_data_as<T>(cos_partial), plan_.groups, cols, const_data_as<T>(pt.inv_norm),
                          data_as<T>(pt.kappa)});
      gemm(plan_, grad_tile, pt.gemm, grad_unit, /*accumulate=*/true, scratch);
      proxy_gradient(plan_, proxy_space_, pt, grad_tile.t(), emb_.gemm, grad_p);
    }
    const at::Tensor grad_x = embeddings_backward(grad_unit, emb_, x_in_);
    return {loss, grad_x, grad_p.to(p_in_.scalar_type()), finish_checks()};
  }

  at::Tensor finish_checks() const { return checks_.finish({op_, x_in_, p_in_, labels_in_, at::Tensor(), shard_.total}); }

 private:
  // S of one tile, by the GEMM, in tile `index` of `sims`.
  at::Tensor similarity(const at::Tensor& sims, int64_t index, const ProxyTile& pt) const {
    const int64_t B = batch(), tile = plan_.tile_columns;
    const at::Tensor sim = prefix(sims.narrow(0, index * B * tile, B * pt.cols), B, pt.cols);
    gemm(plan_, emb_.gemm, pt.gemm.t(), sim, /*accumulate=*/false, at::Tensor());
    return sim;
  }

  // Pass 1's (row, slice) threads per row for a tile of `cols` columns: slices of slice_columns classes.
  int64_t slices_of(int64_t cols) const {
    return plan_.slice_columns == 0 ? 1 : blocks_for(cols / logits_.centers, plan_.slice_columns);
  }

  SoftmaxTile<T> tile_args(const at::Tensor& sim, const ProxyTile& pt) const {
    return SoftmaxTile<T>{row_major_view_of<T>(sim),
                          shard_label_.kernel.template const_data_ptr<int64_t>(),
                          batch(),
                          pt.cols,
                          pt.first / logits_.centers,
                          const_data_as<T>(pt.inv_norm),
                          T(logits_.scale),
                          logits_.exclude_positive,
                          logits_.class_logit<T>()};
  }

  const char* op_;
  const at::Tensor& x_in_;
  const at::Tensor& p_in_;
  const at::Tensor& labels_in_;
  at::ScalarType acc_;
  at::TensorOptions acc_options_;
  at::Tensor x_, p_, labels_;
  TilePlan plan_;
  ValueChecks checks_;
  ShardLabels shard_label_;
  ClassShard shard_;
  Embeddings emb_;
  ProxyTileSpace proxy_space_;
  SoftmaxLogits logits_;
};

template <typename T>
LossAndGrads proxy_softmax_impl(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                                const SoftmaxLogits& logits, double smoothing, CheckMode mode) {
  const int64_t C = p.size(0) / logits.centers;
  SoftmaxTiles<T> tiles(x, p, labels, ClassShard{0, C, C}, logits, mode, "proxy_nca_loss");
  const SoftmaxRows rows = empty_softmax_rows(x);
  const KeptTiles kept = tiles.row_pass(rows, /*with_logit_sum=*/smoothing > 0, tiles.reuse());
  return tiles.loss_and_grads(rows, smoothing, kept);
}

// Sharded pass 1: [4, B] float64 rows (max, sum of e^{z - max}, logit sum, target logit) over
// this shard's proxies, with max = -inf where the shard holds no denominator logit of the row.
template <typename T>
at::Tensor softmax_shard_stats_impl(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                                    const SoftmaxLogits& logits, const ClassShard& shard, CheckMode mode) {
  SoftmaxTiles<T> tiles(x, p, labels, shard, logits, mode, "proxy_nca_shard_row_stats");
  const SoftmaxRows rows = empty_softmax_rows(x);
  tiles.row_pass(rows, /*with_logit_sum=*/true, Reuse{});
  tiles.finish_checks();
  const at::Tensor stats = rows.stats;
  const at::Tensor max = at::where(stats[1] > 0, stats[0], -std::numeric_limits<double>::infinity());
  return at::stack({max, stats[1], stats[2], stats[3]});
}

// Sharded pass 2: the loss from the rows reduced over all shards, and this shard's gradients.
template <typename T>
LossAndGrads softmax_shard_grads_impl(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                                      const at::Tensor& row_stats, const SoftmaxLogits& logits, double smoothing,
                                      const ClassShard& shard, CheckMode mode) {
  SoftmaxTiles<T> tiles(x, p, labels, shard, logits, mode, "proxy_nca_shard_loss_and_grads");
  return tiles.loss_and_grads(SoftmaxRows{row_stats}, smoothing, KeptTiles{});
}

// The softmax family's hyperparameter checks, against the number of classes of all shards.
void check_softmax_params(const SoftmaxLogits& logits, double smoothing, int64_t num_classes, const char* op) {
  const double scale = logits.scale;
  const bool exclude_positive = logits.exclude_positive;
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale must be a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(smoothing >= 0 && smoothing < 1, op, ": smoothing must be in [0, 1), got ", smoothing);
  TORCH_CHECK_VALUE(!(exclude_positive && smoothing > 0), op,
                    ": smoothing is defined for the softmax over all proxies; "
                    "use smoothing=0 with exclude_positive=True");
  TORCH_CHECK_VALUE(!(exclude_positive && num_classes < 2), op,
                    ": exclude_positive=True needs at least 2 proxies "
                    "(the denominator sums over the other classes), got ",
                    num_classes);
  TORCH_CHECK_VALUE(!(smoothing > 0 && num_classes < 2), op, ": label smoothing needs at least 2 proxies, got ",
                    num_classes);
  TORCH_CHECK_VALUE(logits.aggregation == kMaxCenter || logits.aggregation == kSoftCenters, op,
                    ": center_aggregation must be 0 (max) or 1 (softmax-weighted), got ", logits.aggregation);
  TORCH_CHECK_VALUE(std::isfinite(logits.center_gamma) && logits.center_gamma > 0, op,
                    ": center_gamma must be a finite number > 0, got ", logits.center_gamma);
  TORCH_CHECK_VALUE(logits.margin_type >= kNoMargin && logits.margin_type <= kArcFaceMargin, op,
                    ": margin_type must be 0 (none), 1 (CosFace) or 2 (ArcFace), got ", logits.margin_type);
  TORCH_CHECK_VALUE(std::isfinite(logits.margin), op, ": margin must be finite, got ", logits.margin);
  TORCH_CHECK_VALUE(logits.margin_type != kArcFaceMargin || (logits.margin >= 0 && logits.margin < M_PI), op,
                    ": an ArcFace margin must be in [0, pi) radians, got ", logits.margin);
  TORCH_CHECK_VALUE(!(exclude_positive && logits.margin_type != kNoMargin), op,
                    ": exclude_positive=True (the classic ProxyNCA form) takes no margin");
}

// The classes the proxies hold: K rows each.
int64_t classes_of(const at::Tensor& proxies, int64_t centers, const char* op) {
  TORCH_CHECK_VALUE(centers >= 1, op, ": centers_per_class must be >= 1, got ", centers);
  TORCH_CHECK_VALUE(proxies.dim() != 2 || proxies.size(0) % centers == 0, op,
                    ": proxies must have num_classes * centers_per_class rows, got ", proxies.size(0),
                    " rows for ", centers, " centers per class");
  return proxies.dim() == 2 ? proxies.size(0) / centers : 0;
}

SoftmaxLogits softmax_logits(double scale, bool exclude_positive, int64_t centers, int64_t aggregation,
                             double center_gamma, int64_t margin_type, double margin) {
  return {scale, exclude_positive, centers, static_cast<int>(aggregation), center_gamma,
          static_cast<int>(margin_type), margin};
}

}  // namespace

LossAndGrads proxy_nca_loss(const at::Tensor& embeddings, const at::Tensor& proxies, const at::Tensor& labels,
                            double scale, double smoothing, bool exclude_positive, int64_t value_checks,
                            int64_t centers_per_class, int64_t center_aggregation, double center_gamma,
                            int64_t margin_type, double margin) {
  const char* op = "proxy_nca_loss";
  check_metadata(embeddings, proxies, labels, op);
  const CheckMode mode = check_mode(value_checks, op);
  const int64_t classes = classes_of(proxies, centers_per_class, op);
  const SoftmaxLogits logits =
      softmax_logits(scale, exclude_positive, centers_per_class, center_aggregation, center_gamma, margin_type, margin);
  check_softmax_params(logits, smoothing, classes, op);
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return proxy_softmax_impl<decltype(zero)>(embeddings, proxies, labels, logits, smoothing, mode);
  });
}

at::Tensor proxy_nca_shard_row_stats(const at::Tensor& embeddings, const at::Tensor& proxies, const at::Tensor& labels,
                                     double scale, bool exclude_positive, int64_t class_offset, int64_t num_classes,
                                     int64_t value_checks, int64_t centers_per_class, int64_t center_aggregation,
                                     double center_gamma, int64_t margin_type, double margin) {
  const char* op = "proxy_nca_shard_row_stats";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(classes_of(proxies, centers_per_class, op), class_offset, num_classes, op);
  const CheckMode mode = check_mode(value_checks, op);
  TORCH_CHECK_VALUE(mode != CheckMode::kDeferred, op,
                    ": value_checks must be 0 or 1 (the second pass checks the same inputs), got 2");
  const SoftmaxLogits logits =
      softmax_logits(scale, exclude_positive, centers_per_class, center_aggregation, center_gamma, margin_type, margin);
  check_softmax_params(logits, 0.0, shard.total, op);
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return softmax_shard_stats_impl<decltype(zero)>(embeddings, proxies, labels, logits, shard, mode);
  });
}

LossAndGrads proxy_nca_shard_loss_and_grads(const at::Tensor& embeddings, const at::Tensor& proxies,
                                            const at::Tensor& labels, const at::Tensor& row_stats, double scale,
                                            double smoothing, bool exclude_positive, int64_t class_offset,
                                            int64_t num_classes, int64_t value_checks, int64_t centers_per_class,
                                            int64_t center_aggregation, double center_gamma, int64_t margin_type,
                                            double margin) {
  const char* op = "proxy_nca_shard_loss_and_grads";
  check_metadata(embeddings, proxies, labels, op);
  const ClassShard shard = class_shard(classes_of(proxies, centers_per_class, op), class_offset, num_classes, op);
  const CheckMode mode = check_mode(value_checks, op);
  const SoftmaxLogits logits =
      softmax_logits(scale, exclude_positive, centers_per_class, center_aggregation, center_gamma, margin_type, margin);
  check_softmax_params(logits, smoothing, shard.total, op);
  TORCH_CHECK_VALUE(row_stats.scalar_type() == at::kDouble && row_stats.dim() == 2 && row_stats.size(0) == 4 &&
                        row_stats.size(1) == embeddings.size(0) && row_stats.device() == embeddings.device(),
                    op, ": row_stats must be a float64 tensor of shape (4, ", embeddings.size(0), ") on ",
                    embeddings.device(), " (the reduced proxy_nca_shard_row_stats), got a ", describe(row_stats));
  return run_accumulating(embeddings, has_float64(embeddings, proxies), [&](auto zero) {
    return softmax_shard_grads_impl<decltype(zero)>(embeddings, proxies, labels, row_stats.contiguous(), logits,
                                                    smoothing, shard, mode);
  });
}

}  // namespace dmlfast
