#include "checks.h"

#include <ATen/ATen.h>

#include "proxy_loss_math.h"

namespace dmlfast {

std::string describe(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type())) + " tensor of shape " + c10::str(t.sizes()) + " on " +
         t.device().str();
}

void check_metadata(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": embeddings must be 2-D (batch, dim), got a ", describe(x));
  TORCH_CHECK_VALUE(p.dim() == 2, op, ": proxies must be 2-D (num_classes, dim), got a ", describe(p));
  TORCH_CHECK_VALUE(labels.dim() == 1, op, ": labels must be 1-D (batch,), got a ", describe(labels));
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": embeddings must be float32, bfloat16, float16 or float64, got ", describe(x));
  TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op,
                   ": proxies must be float32, bfloat16, float16 or float64, got ", describe(p));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", describe(labels));
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": the batch is empty (embeddings has 0 rows)");
  TORCH_CHECK_VALUE(p.size(0) > 0, op, ": proxies has 0 rows (num_classes must be >= 1)");
  TORCH_CHECK_VALUE(x.size(1) > 0, op, ": embeddings have dimension 0");
  TORCH_CHECK_VALUE(labels.size(0) == x.size(0), op,
                    ": labels must have one entry per embedding: embeddings has ", x.size(0),
                    " rows, labels has ", labels.size(0));
  TORCH_CHECK_VALUE(p.size(1) == x.size(1), op,
                    ": embedding dimension and proxy dimension differ: embeddings are ", x.size(1),
                    "-d, proxies are ", p.size(1), "-d");
  TORCH_CHECK_VALUE(x.device() == p.device() && x.device() == labels.device(), op,
                    ": embeddings, proxies and labels must be on one device, got ", x.device(), ", ",
                    p.device(), " and ", labels.device());
}

ClassShard class_shard(int64_t local, int64_t class_offset, int64_t num_classes, const char* op) {
  const int64_t total = num_classes < 0 ? local : num_classes;
  TORCH_CHECK_VALUE(class_offset >= 0 && class_offset + local <= total, op, ": the proxies (", local,
                    " rows) must be classes [class_offset, class_offset + ", local, ") of num_classes = ", total,
                    ", got class_offset ", class_offset);
  return {class_offset, local, total};
}

ShardLabels shard_labels(const at::Tensor& labels, const ClassShard& shard) {
  if (!shard.sharded()) {
    const at::Tensor safe = labels.clamp(0, shard.local - 1).contiguous();
    return {safe, safe};
  }
  const at::Tensor local = (labels - shard.offset).contiguous();
  return {local, local.clamp(0, shard.local - 1).contiguous()};
}

CheckMode check_mode(int64_t value, const char* op) {
  TORCH_CHECK_VALUE(value >= 0 && value <= 2, op,
                    ": value_checks must be 0 (off), 1 (immediate) or 2 (deferred), got ", value);
  return static_cast<CheckMode>(value);
}

namespace {

// The first row of a matrix with a non-finite entry, or -1.
int64_t first_nonfinite_row(const at::Tensor& t) {
  const at::Tensor bad = at::logical_not(at::isfinite(t).all(1));
  return bad.any().item<bool>() ? bad.to(at::kInt).argmax().item<int64_t>() : -1;
}

// Why the rows of `t` (embeddings, proxies or uncertainty) failed their finiteness check: a NaN
// or Inf entry, or finite entries whose norm overflows the accumulation dtype (as the kernels
// compute it: `wide_sum` summed in float64, as EmbeddingRows does, else in the accumulation dtype).
std::string nonfinite_reason(const at::Tensor& t, const char* name, const char* verb, bool wide_sum) {
  const int64_t row = first_nonfinite_row(t);
  if (row >= 0) return std::string(name) + " " + verb + " NaN or Inf (first bad row: " + std::to_string(row) + ")";
  const bool wide_acc = t.scalar_type() == at::kDouble;
  const at::ScalarType acc = wide_acc ? at::kDouble : at::kFloat;
  const at::Tensor norms = wide_sum ? at::linalg_vector_norm(t.to(at::kDouble), 2, at::IntArrayRef{1}).to(acc)
                                    : at::linalg_vector_norm(t, 2, at::IntArrayRef{1}, false, acc);
  const int64_t first = at::logical_not(at::isfinite(norms)).to(at::kInt).argmax().item<int64_t>();
  const double largest = t[first].abs().max().item<double>();
  return std::string(name) + " are finite, but the norm of row " + std::to_string(first) + " overflows " +
         (wide_acc ? "float64" : "float32") + " (its largest entry is " + c10::str(largest) +
         " in magnitude); values this large usually mean a diverging model: lower the learning rate or clip "
         "gradients";
}

}  // namespace

void raise_for_value_flags(const at::Tensor& flags, const CheckedInputs& in) {
  const at::Tensor host = flags.to(at::kCPU, at::kInt).contiguous();
  TORCH_CHECK(host.numel() == kNumValueFlags, in.op, ": value flags must have ", kNumValueFlags, " entries");
  const int32_t* ok = host.const_data_ptr<int32_t>();
  if (!ok[kLabelsInRange]) {
    const auto [min, max] = at::aminmax(in.labels);
    TORCH_CHECK_VALUE(false, in.op, ": labels must be in [0, ", in.num_classes,
                      ") (num_classes = proxies.shape[0]), got min ", min.item<int64_t>(), " and max ",
                      max.item<int64_t>());
  }
  TORCH_CHECK_VALUE(ok[kEmbeddingsFinite], in.op, ": ", nonfinite_reason(in.embeddings, "embeddings", "contain", true));
  TORCH_CHECK_VALUE(ok[kProxiesFinite], in.op, ": ", nonfinite_reason(in.proxies, "proxies", "contain", false));
  TORCH_CHECK_VALUE(ok[kUncertaintyFinite], in.op, ": ",
                    nonfinite_reason(in.uncertainty, "uncertainty", "contains", false));
}

ValueChecks::ValueChecks(const at::Tensor& on, CheckMode mode)
    : mode_(mode), flags_(at::ones({kNumValueFlags}, on.options().dtype(at::kInt))) {}

int32_t* ValueChecks::device_flags() const {
  return mode_ == CheckMode::kOff ? nullptr : flags_.data_ptr<int32_t>();
}

at::Tensor ValueChecks::finish(const CheckedInputs& inputs) const {
  if (mode_ == CheckMode::kImmediate) raise_for_value_flags(flags_, inputs);
  return flags_;
}

}  // namespace dmlfast
