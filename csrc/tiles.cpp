#include "tiles.h"

#include <algorithm>
#include <type_traits>

namespace dmlfast {
namespace {

TilePlanOverride plan_override;

// On the GPU a tile of S is 2^24 floats (64 MiB): large enough that the GEMMs run at full speed
// and a million classes take a few dozen tiles (each tile costs ~10 launches). On the CPU a tile
// of S stays near L2 size.
constexpr int64_t kGpuTileFloats = int64_t{1} << 24;
constexpr int64_t kCpuTileFloats = int64_t{1} << 19;
// GPU: 32 rows per epilogue thread (a 256-row batch gives 8 threads per column); 32 columns per
// softmax slice thread, merged 32 at a time. CPU: a whole column per thread where tiles are stored
// by column, 64 rows where they are stored by row (a block's 128 columns x 64 rows stay in L1; 16
// or 256 measured slower at the SOP shape), one slice per row (walked in order).
constexpr int64_t kGpuRowsPerGroup = 32, kCpuRowsPerRowMajorGroup = 64;
constexpr int64_t kGpuSliceColumns = 32;
constexpr int64_t kMergeFanIn = 32;
// Four neighbouring components per thread: 16-byte float accesses, one index division per four.
constexpr int64_t kGpuFinishChunk = 4;
// Softmax pass 2: one class per GPU thread (neighbouring threads, neighbouring columns); on the CPU
// a run of classes whose rows the compiler vectorizes, 128 x 64 rows of a tile in L1.
constexpr int64_t kCpuClassesPerThread = 128;
// Bytes of the softmax family's pass-1 tiles of S (and their exponentials) that pass 2 reuses
// instead of recomputing them (a fourth GEMM over the tiles beyond it): memory stays bounded for
// any number of classes.
constexpr int64_t kSoftmaxReuseBytes = int64_t{64} << 20;

bool is_low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

void set_tile_plan_override(const TilePlanOverride& override_values) { plan_override = override_values; }

TilePlan plan_tiles(const at::Tensor& x, int64_t num_local_classes, at::ScalarType acc, Family family) {
  const int64_t batch = x.size(0), dim = x.size(1);
  const bool gpu = x.is_cuda();
  TilePlan plan;
  const int64_t tile = gpu ? kGpuTileFloats / batch : kCpuTileFloats / (batch + dim);
  plan.tile_columns = std::max<int64_t>(256, tile);
  plan.column_major = !gpu && family == Family::kAnchor;
  plan.rows_per_group = gpu ? kGpuRowsPerGroup : (plan.column_major ? batch : kCpuRowsPerRowMajorGroup);
  plan.slice_columns = gpu ? kGpuSliceColumns : 0;
  plan.merge_fan_in = kMergeFanIn;
  plan.finish_chunk = gpu ? kGpuFinishChunk : 0;
  plan.keep_exponentials = !gpu;
  plan.classes_per_thread = gpu ? 1 : kCpuClassesPerThread;
  plan.reuse_bytes = kSoftmaxReuseBytes;
  bool low_precision = gpu && acc == at::kFloat && is_low_precision(x.scalar_type());
  const TilePlanOverride& o = plan_override;
  if (o.tile_columns > 0) plan.tile_columns = o.tile_columns;
  if (o.rows_per_group > 0) plan.rows_per_group = o.rows_per_group;
  if (o.slice_columns >= 0) plan.slice_columns = o.slice_columns;
  if (o.merge_fan_in > 1) plan.merge_fan_in = o.merge_fan_in;
  if (o.column_major >= 0) plan.column_major = o.column_major != 0;
  if (o.finish_chunk >= 0) plan.finish_chunk = o.finish_chunk;
  if (o.keep_exponentials >= 0) plan.keep_exponentials = o.keep_exponentials != 0;
  if (o.classes_per_thread > 0) plan.classes_per_thread = o.classes_per_thread;
  if (o.reuse_bytes >= 0) plan.reuse_bytes = o.reuse_bytes;
  if (o.low_precision_gemm >= 0) low_precision = o.low_precision_gemm != 0 && acc == at::kFloat && is_low_precision(x.scalar_type());
  plan.tile_columns = std::min(plan.tile_columns, num_local_classes);
  plan.groups = blocks_for(batch, plan.rows_per_group);
  plan.gemm_dtype = low_precision ? x.scalar_type() : acc;
  plan.emulate_gemm = low_precision && !gpu;
  return plan;
}

at::Tensor prefix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

at::Tensor tile_in(const at::Tensor& buffer, int64_t rows, int64_t cols, bool column_major) {
  return column_major ? prefix(buffer, cols, rows).t() : prefix(buffer, rows, cols);
}

void gemm(const TilePlan& plan, const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, bool accumulate,
          const at::Tensor& scratch) {
  at::Tensor result = out;
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) {
      result.addmm_(a, b);
    } else {
      at::mm_out(result, a, b);
    }
    return;
  }
  at::Tensor target = accumulate ? scratch : out;
  if (plan.emulate_gemm) {
    // The CPU has no bf16 x bf16 -> float32 GEMM: the same products from the rounded operands.
    at::mm_out(target, a.to(out.scalar_type()), b.to(out.scalar_type()));
  } else {
    at::mm_out(target, a, b, out.scalar_type());
  }
  if (accumulate) result.add_(target);
}

at::Tensor kernel_embeddings(const at::Tensor& x, at::ScalarType acc) {
  return (acc == at::kDouble ? x.to(at::kDouble) : x).contiguous();
}

at::Tensor kernel_proxies(const at::Tensor& p, at::ScalarType acc) { return p.to(acc).contiguous(); }

Embeddings embedding_rows(const TilePlan& plan, const at::Tensor& x, const at::Tensor& labels, int64_t num_classes,
                          at::ScalarType acc, bool raw, int32_t* flags) {
  const int64_t B = x.size(0), D = x.size(1);
  const auto options = x.options().dtype(acc);
  Embeddings emb;
  emb.norm = at::empty({B}, options);
  if (raw) emb.sq = at::empty({B}, options);
  if (!raw) emb.unit = at::empty({B, D}, options);
  // The GEMMs read x_hat itself when it is in their dtype, and x itself (IDML) when it is.
  const bool own_copy = raw ? x.scalar_type() != plan.gemm_dtype : plan.gemm_dtype != acc;
  emb.gemm = own_copy ? at::empty({B, D}, x.options().dtype(plan.gemm_dtype)) : (raw ? x : emb.unit);
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  auto run = [&](auto in_zero, auto acc_zero, auto gemm_zero) {
    using In = decltype(in_zero);
    using T = decltype(acc_zero);
    using G = decltype(gemm_zero);
    launch(x, B,
           EmbeddingRows<In, T, G>{const_data_as<In>(x), label_ptr, B, D, num_classes,
                                   raw ? nullptr : data_as<T>(emb.unit), own_copy ? data_as<G>(emb.gemm) : nullptr,
                                   raw, raw ? data_as<T>(emb.sq) : nullptr, data_as<T>(emb.norm), flags});
  };
  if (acc == at::kDouble) {
    TORCH_INTERNAL_ASSERT(x.scalar_type() == at::kDouble && plan.gemm_dtype == at::kDouble,
                          "embedding_rows: float64 accumulation needs float64 embeddings");
    run(double{}, double{}, double{});
    return emb;
  }
  with_storage_type(x.scalar_type(), [&](auto in_zero) {
    using In = decltype(in_zero);
    with_storage_type(plan.gemm_dtype, [&](auto gemm_zero) {
      using G = decltype(gemm_zero);
      if constexpr (!std::is_same_v<In, double> && (std::is_same_v<G, float> || std::is_same_v<G, In>)) {
        run(in_zero, float{}, gemm_zero);
      } else {
        TORCH_INTERNAL_ASSERT(false, "embedding_rows: unsupported dtypes ", x.scalar_type(), " -> ", plan.gemm_dtype);
      }
    });
  });
  return emb;
}

at::Tensor embeddings_backward(const at::Tensor& grad_unit, const Embeddings& emb, const at::Tensor& x) {
  const int64_t B = x.size(0), D = x.size(1);
  const at::ScalarType acc = grad_unit.scalar_type();
  const bool direct = acc == at::kDouble ? x.scalar_type() == at::kDouble : x.scalar_type() != at::kDouble;
  at::Tensor out = at::empty({B, D}, x.options().dtype(direct ? x.scalar_type() : acc));
  with_acc_type(acc, [&](auto acc_zero) {
    using T = decltype(acc_zero);
    with_storage_type(out.scalar_type(), [&](auto out_zero) {
      using Out = decltype(out_zero);
      if constexpr (std::is_same_v<T, double> == std::is_same_v<Out, double>) {
        launch(x, B,
               EmbeddingBackward<T, Out>{const_data_as<T>(grad_unit), const_data_as<T>(emb.unit),
                                         const_data_as<T>(emb.norm), B, D, data_as<Out>(out)});
      }
    });
  });
  return direct ? out : out.to(x.scalar_type());
}

ProxyTileSpace::ProxyTileSpace(const TilePlan& plan, const at::Tensor& p, at::ScalarType acc) {
  const auto options = p.options().dtype(acc);
  const int64_t tile = plan.tile_columns, D = p.size(1);
  norm = at::empty({tile}, options);
  inv_norm = at::empty({tile}, options);
  kappa = at::empty({tile}, options);
  if (plan.gemm_dtype != acc) {
    gemm_copy = at::empty({tile * D}, p.options().dtype(plan.gemm_dtype));
    grad_out = at::empty({tile * D}, p.options().dtype(plan.gemm_dtype));
  }
}

ProxyTile proxy_tile(const ProxyTileSpace& space, const at::Tensor& p, int64_t first, int64_t cols, at::ScalarType acc,
                     int32_t* flags) {
  ProxyTile t;
  t.first = first;
  t.cols = cols;
  t.raw = p.narrow(0, first, cols);
  t.norm = space.norm.narrow(0, 0, cols);
  t.inv_norm = space.inv_norm.narrow(0, 0, cols);
  t.kappa = space.kappa.narrow(0, 0, cols);
  at::linalg_vector_norm_out(t.norm, t.raw, 2, at::IntArrayRef{1}, false, acc);
  with_acc_type(acc, [&](auto acc_zero) {
    using T = decltype(acc_zero);
    launch(p, cols, ColumnScales<T>{const_data_as<T>(t.norm), cols, data_as<T>(t.inv_norm), flags});
  });
  if (space.gemm_copy.defined()) {
    t.gemm = prefix(space.gemm_copy, cols, p.size(1));
    t.gemm.copy_(t.raw);
  } else {
    t.gemm = t.raw;
  }
  return t;
}

void proxy_gradient(const TilePlan& plan, const ProxyTileSpace& space, const ProxyTile& tile, const at::Tensor& grad_t,
                    const at::Tensor& x_gemm, const at::Tensor& grad_p) {
  const int64_t D = grad_p.size(1);
  const at::Tensor rows = grad_p.narrow(0, tile.first, tile.cols);
  const at::Tensor product = space.grad_out.defined() ? prefix(space.grad_out, tile.cols, D) : rows;
  gemm(plan, grad_t, x_gemm, product, /*accumulate=*/false, at::Tensor());
  with_acc_type(grad_p.scalar_type(), [&](auto acc_zero) {
    using T = decltype(acc_zero);
    with_tile_type<T>(product.scalar_type(), [&](auto gemm_zero) {
      using S = decltype(gemm_zero);
      const int64_t chunk = plan.finish_chunk > 0 ? plan.finish_chunk : D;
      launch(grad_p, tile.cols * blocks_for(D, chunk),
             ProxyGradFinish<T, S>{const_data_as<S>(product), const_data_as<S>(tile.gemm), const_data_as<T>(tile.kappa),
                                   tile.cols, D, chunk, data_as<T>(rows)});
    });
  });
}

}  // namespace dmlfast
