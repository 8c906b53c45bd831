// The tile driver shared by the fused ops: how a call's proxies are cut into tiles, the one
// workspace every tile reuses, the GEMMs, and the steps every family runs (embedding rows,
// a proxy tile's norms, the proxy gradient's finish, the embeddings' backward).
//
// One call, whatever the family: normalize the embeddings once; then, for each tile of proxy
// columns, S = X_hat P_tile^T on the raw proxies (a GEMM into the workspace), the family's
// epilogue kernels turn S into G' (and kappa), dX_hat += G' P_tile and dP_tile = G'^T X_hat -
// kappa P_tile (two GEMMs and one elementwise pass straight into the gradient's rows). Memory is
// O(B D + C D + B tile), plus the tiles of S the softmax family keeps for its second pass, up to a
// fixed budget (TilePlan::reuse_bytes): never a B x C tensor, whatever C is. Nothing is allocated inside the
// tile loop. The ATen calls run with autocast excluded: the op chooses its dtypes.
//
// Precision: S, G and every sum are in the accumulation dtype T (float, or double for float64
// inputs). On CUDA, bfloat16/float16 embeddings (autocast) make the GEMMs read that dtype and
// write float32 (tensor cores, float32 accumulation); float32 GEMMs follow
// torch.backends.cuda.matmul (TF32 under "high").
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>
#include <type_traits>

#include "checks.h"
#include "launch.h"

namespace dmlfast {

enum class Family { kAnchor, kSoftmax };

// How one call is cut into work.
struct TilePlan {
  int64_t tile_columns;       // proxies per tile
  int64_t rows_per_group;     // rows per (column, group) thread of the tile epilogues
  int64_t groups;             // blocks_for(batch, rows_per_group)
  int64_t slice_columns;      // softmax pass 1: columns per (row, slice) thread; 0: the whole tile row
  int64_t merge_fan_in;       // softmax pass 1: partials merged per thread and tree level
  int64_t finish_chunk;       // proxy-gradient components per ProxyGradFinish thread (0: a whole row)
  int64_t classes_per_thread; // softmax pass 2: classes per (run, row group) thread
  bool column_major;          // S tiles stored column by column (walked down columns on the CPU)
  bool keep_exponentials;     // softmax pass 1 keeps e^{z - shift} with its kept tiles (the CPU: an
                              // exponential costs more there than the buffer's traffic)
  int64_t reuse_bytes;        // softmax: bytes of pass 1's tiles that pass 2 may reuse instead of
                              // recomputing them
  at::ScalarType gemm_dtype;  // what the tile GEMMs read
  bool emulate_gemm;          // low-precision GEMMs emulated on the CPU (tests), see gemm()
};

TilePlan plan_tiles(const at::Tensor& x, int64_t num_local_classes, at::ScalarType acc, Family family);

// Values tests set so that the CPU runs the GPU's plan (its tile parameters, row-major tiles,
// low-precision GEMMs); a field < 0 keeps the device's default. dmlfast._C._override_tile_plan.
struct TilePlanOverride {
  int64_t tile_columns = -1;
  int64_t rows_per_group = -1;
  int64_t slice_columns = -1;
  int64_t merge_fan_in = -1;
  int64_t column_major = -1;
  int64_t low_precision_gemm = -1;
  int64_t finish_chunk = -1;
  int64_t keep_exponentials = -1;
  int64_t classes_per_thread = -1;
  int64_t reuse_bytes = -1;
};
void set_tile_plan_override(const TilePlanOverride& override_values);

// A contiguous [rows, cols] view of the first rows * cols elements of a flat workspace buffer.
at::Tensor prefix(const at::Tensor& buffer, int64_t rows, int64_t cols);

// A [rows, cols] tile in a flat buffer, stored row by row or column by column.
at::Tensor tile_in(const at::Tensor& buffer, int64_t rows, int64_t cols, bool column_major);

template <typename E>
TileView<E> view_of(const at::Tensor& tile) {
  return {reinterpret_cast<E*>(tile.data_ptr()), tile.stride(0), tile.stride(1)};
}

template <typename E>
RowMajorView<E> row_major_view_of(const at::Tensor& tile) {
  TORCH_INTERNAL_ASSERT(tile.dim() == 2 && (tile.size(1) <= 1 || tile.stride(1) == 1), "dmlfast: a row-major tile expected");
  return {reinterpret_cast<E*>(tile.data_ptr()), tile.stride(0)};
}

// out = a @ b in out's dtype (the accumulation dtype), or out += a @ b with `accumulate`.
// a and b are in the plan's GEMM dtype; `scratch` (like out) takes the product first when a
// low-precision GEMM accumulates. `out` must be contiguous.
void gemm(const TilePlan& plan, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate,
          const at::Tensor& scratch);

// Pointer to a tensor's data as the kernels' storage type E (float, double, c10::BFloat16, c10::Half).
template <typename E>
E* data_as(const at::Tensor& t) {
  return reinterpret_cast<E*>(t.data_ptr());
}
template <typename E>
const E* const_data_as(const at::Tensor& t) {
  return reinterpret_cast<const E*>(t.const_data_ptr());
}

// Calls f(E{}) with E the storage type of `dtype` (float32, float64, bfloat16, float16).
template <typename F>
auto with_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: return f(float{});
  }
}

// Calls f(T{}) with T the accumulation type of `acc` (float64, else float32).
template <typename F>
auto with_acc_type(at::ScalarType acc, F&& f) {
  return acc == at::kDouble ? f(double{}) : f(float{});
}

// Calls f(O{}) with O the storage type of a tile the GEMMs read (`dtype`: T, or bfloat16/float16
// with T = float).
template <typename T, typename F>
void with_tile_type(at::ScalarType dtype, F&& f) {
  with_storage_type(dtype, [&](auto zero) {
    using O = decltype(zero);
    if constexpr (std::is_same_v<O, T> || (std::is_same_v<T, float> && !std::is_same_v<O, double>)) {
      f(zero);
    } else {
      TORCH_INTERNAL_ASSERT(false, "dmlfast: no kernels for tiles of dtype ", dtype);
    }
  });
}

// The embeddings as the tiles use them: n (norms), x_hat (unit) and what the GEMMs read.
struct Embeddings {
  at::Tensor norm;   // [B] T
  at::Tensor sq;     // [B] T: ||x||^2 (IDML only)
  at::Tensor unit;   // [B, D] T: x_hat (not for IDML)
  at::Tensor gemm;   // [B, D] GEMM dtype: x_hat, or x as given for IDML
};

// One launch of EmbeddingRows: norms, x_hat and the GEMMs' copy, with the label and finiteness
// checks. `raw`: IDML's form (x as given, its squared norms, no x_hat). `x` comes from
// kernel_embeddings.
Embeddings embedding_rows(const TilePlan& plan, const at::Tensor& x, const at::Tensor& labels, int64_t num_classes,
                          at::ScalarType acc, bool raw, int32_t* flags);

// The inputs as the kernels read them: contiguous; the embeddings in float64 when the
// accumulation is (an input is float64); the proxies in the accumulation dtype (a copy only for
// proxies in another dtype than their usual float32, or float64 for gradcheck).
at::Tensor kernel_embeddings(const at::Tensor& x, at::ScalarType acc);
at::Tensor kernel_proxies(const at::Tensor& p, at::ScalarType acc);

// Whether the math accumulates in float64: an input is float64 (float32 otherwise).
inline bool has_float64(const at::Tensor& x, const at::Tensor& p) {
  return x.scalar_type() == at::kDouble || p.scalar_type() == at::kDouble;
}

// `impl(T{})` with the accumulation type T (double when `wide`, else float), on the device of
// `on` with autocast excluded: the ATen calls inside run in the dtypes the op chose.
template <typename Impl>
auto run_accumulating(const at::Tensor& on, bool wide, Impl&& impl) {
  const c10::DeviceGuard guard(on.device());
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return wide ? impl(double{}) : impl(float{});
}

// dL/dx from dL/dx_hat (EmbeddingBackward), in the dtype of `x` (the embeddings as given).
at::Tensor embeddings_backward(const at::Tensor& grad_unit, const Embeddings& emb, const at::Tensor& x);

// The workspace of a proxy tile: norms, 1/m, kappa and, with low-precision GEMMs, the tile's
// copy in their dtype and the dP GEMM's output (in that dtype too, like the floor's).
struct ProxyTileSpace {
  at::Tensor norm, inv_norm, kappa;  // [tile] T
  at::Tensor gemm_copy;              // [tile * D] GEMM dtype, or undefined
  at::Tensor grad_out;               // [tile * D] GEMM dtype, or undefined
  ProxyTileSpace(const TilePlan& plan, const at::Tensor& p, at::ScalarType acc);
};

// Rows [first, first + cols) of the proxies as the tile uses them.
struct ProxyTile {
  at::Tensor raw;       // [cols, D] the proxies' own rows
  at::Tensor gemm;      // [cols, D] what the GEMMs read (raw, or the converted copy)
  at::Tensor norm;      // [cols] ||p_c||
  at::Tensor inv_norm;  // [cols] 1 / m_c
  at::Tensor kappa;     // [cols]
  int64_t first, cols;
};

// The tile's rows, their norms and 1/m (ATen's row norm, then ColumnScales with the proxies'
// finiteness check), and the GEMMs' copy.
ProxyTile proxy_tile(const ProxyTileSpace& space, const at::Tensor& p, int64_t first, int64_t cols, at::ScalarType acc,
                     int32_t* flags);

// dP_tile = G'^T X_hat (the GEMM, straight into the gradient's rows unless the GEMMs are in low
// precision), then ProxyGradFinish subtracts kappa_c p_c.
void proxy_gradient(const TilePlan& plan, const ProxyTileSpace& space, const ProxyTile& tile, const at::Tensor& grad_t,
                    const at::Tensor& x_gemm, const at::Tensor& grad_p);

}  // namespace dmlfast
