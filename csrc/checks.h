// The fused ops' input checks: metadata at the boundary (shapes, dtypes, devices; no device
// reads), class shards, and value checks (labels in range, finite inputs) that the kernels
// compute into flags on the device while the loss runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace dmlfast {

std::string describe(const at::Tensor& t);

// Shapes, dtypes and devices of (embeddings, proxies, labels).
void check_metadata(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, const char* op);

// The classes this call's proxies stand for: rows 0..local-1 of `proxies` are classes
// offset..offset+local-1 of `total`. Unsharded, offset = 0 and local = total. Sharded across
// processes (dmlfast.sharded), labels are global and the normalizers count all `total` classes.
struct ClassShard {
  int64_t offset;
  int64_t local;
  int64_t total;
  bool sharded() const { return offset != 0 || local != total; }
};

// The shard of the `local` classes a call's proxies hold; `num_classes` < 0 means "all": the
// proxies are every class.
ClassShard class_shard(int64_t local, int64_t class_offset, int64_t num_classes, const char* op);

// Labels as the kernels use them: compared with local class indices (first_class + column), so a
// label of another shard never matches a column. Unsharded they are the labels clamped to [0, C),
// so that per-class lookups stay in bounds until the value checks raise on out-of-range labels
// (whose results are never returned); sharded, labels - offset (the kernels clamp their gathers).
// `row` is a valid proxy row for each sample, for index_add_.
struct ShardLabels {
  at::Tensor kernel;
  at::Tensor row;
};
ShardLabels shard_labels(const at::Tensor& labels, const ClassShard& shard);

// What the value checks do, the ops' `value_checks` argument (dmlfast/_ops.py picks it):
// off; immediate (the op reads its flags back, one blocking host read, and raises); deferred
// (the op returns its flags unread and the autograd backward raises before any gradient leaves).
enum class CheckMode : int64_t { kOff = 0, kImmediate = 1, kDeferred = 2 };
CheckMode check_mode(int64_t value, const char* op);

// The inputs a value check speaks of, for its error message.
struct CheckedInputs {
  const char* op;
  at::Tensor embeddings, proxies, labels, uncertainty;  // uncertainty: undefined unless IDML
  int64_t num_classes;
};

// Raises the checks' clear error (ValueError) if a flag of `flags` (int32 [4], ValueFlag order;
// on any device: reading it is the one host read) is 0.
void raise_for_value_flags(const at::Tensor& flags, const CheckedInputs& inputs);

// A call's value-check flags: int32 [4] on the call's device, all 1 until a kernel clears one.
class ValueChecks {
 public:
  ValueChecks(const at::Tensor& on, CheckMode mode);
  // What the kernels write to; null when the checks are off.
  int32_t* device_flags() const;
  // The op's last output: the flags, after raising on them in immediate mode.
  at::Tensor finish(const CheckedInputs& inputs) const;

 private:
  CheckMode mode_;
  at::Tensor flags_;
};

}  // namespace dmlfast
