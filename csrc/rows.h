// Row-wise normalization and its backward (SPEC §0, §7.1) for whole matrices.
#pragma once

#include <ATen/core/Tensor.h>

namespace dmlfast {

// unit = in / norm row by row, with norm = sqrt(sum in^2 + eps), computed in the dtype of `in`
// (callers pass float32 or float64).
struct UnitRows {
  at::Tensor unit;  // [R, D]
  at::Tensor norm;  // [R]
};
UnitRows normalize_rows(const at::Tensor& in);

// out = (1/norm)(g - <unit, g> unit) row by row, written into `out` ([R, D], any floating dtype)
// from g, unit and norm in the accumulation dtype.
void project_rows(const at::Tensor& g, const UnitRows& rows, const at::Tensor& out);

}  // namespace dmlfast
