#include "rows.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "proxy_loss_math.h"

namespace dmlfast {

// On the CPU each row is one call of the shared row functions; on CUDA the same formulas are
// composed from ATen's reductions, which already read memory coalesced.

UnitRows normalize_rows(const at::Tensor& in) {
  if (in.is_cuda()) {
    const at::Tensor norm = in.square().sum(1).add_(kNormEps).sqrt_();
    return {in / norm.unsqueeze(1), norm};
  }
  const at::Tensor src = in.contiguous();
  const int64_t rows = src.size(0), dim = src.size(1);
  at::Tensor unit = at::empty({rows, dim}, src.options());
  at::Tensor norm = at::empty({rows}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "normalize_rows", [&] {
    const scalar_t* in_ptr = src.const_data_ptr<scalar_t>();
    scalar_t* unit_ptr = unit.data_ptr<scalar_t>();
    scalar_t* norm_ptr = norm.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        norm_ptr[r] = normalize_row(in_ptr + r * dim, dim, unit_ptr + r * dim);
      }
    });
  });
  return {unit, norm};
}

void project_rows(const at::Tensor& g, const UnitRows& rows, const at::Tensor& out) {
  const at::Tensor& unit = rows.unit;
  if (out.is_cuda()) {
    const at::Tensor dot = (g * unit).sum(1, /*keepdim=*/true);
    out.copy_((g - dot * unit) / rows.norm.unsqueeze(1));
    return;
  }
  TORCH_INTERNAL_ASSERT(g.is_contiguous() && unit.is_contiguous() && out.is_contiguous());
  TORCH_INTERNAL_ASSERT(g.scalar_type() == unit.scalar_type());
  const int64_t count = g.size(0), dim = g.size(1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "project_rows", [&] {
    using acc_t = scalar_t;
    const acc_t* g_ptr = g.const_data_ptr<acc_t>();
    const acc_t* unit_ptr = unit.const_data_ptr<acc_t>();
    const acc_t* norm_ptr = rows.norm.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "project_rows_out", [&] {
      scalar_t* out_ptr = out.data_ptr<scalar_t>();
      at::parallel_for(0, count, 64, [&](int64_t first, int64_t last) {
        for (int64_t r = first; r < last; ++r) {
          project_row(g_ptr + r * dim, unit_ptr + r * dim, norm_ptr[r], dim, out_ptr + r * dim);
        }
      });
    });
  });
}

}  // namespace dmlfast
