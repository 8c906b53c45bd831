// Operator schemas (TORCH_LIBRARY), their CPU/CUDA kernels, and the Python module dmlfast._C.
// Fake (meta) tensors, autograd and autocast behaviour are registered in dmlfast/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "checks.h"
#include "fused_losses.h"
#include "launch.h"
#include "tiles.h"

#ifndef DMLFAST_TORCH_VERSION
#error "DMLFAST_TORCH_VERSION must be defined by the build (the torch version compiled against)"
#endif
#ifndef DMLFAST_CUDA_ARCH_LIST
#define DMLFAST_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(dmlfast, m) {
  m.def(
      "proxy_anchor_loss(Tensor embeddings, Tensor proxies, Tensor labels, float margin, float alpha, "
      "Tensor? isa_class_params=None, bool isa_filter_positives=False, int class_offset=0, int num_classes=-1, "
      "int value_checks=1) -> (Tensor loss, Tensor grad_embeddings, Tensor grad_proxies, Tensor value_flags)");
  m.def(
      "idml_proxy_anchor_loss(Tensor embeddings, Tensor uncertainty, Tensor proxies, Tensor labels, float margin, "
      "float alpha, int class_offset=0, int num_classes=-1, int value_checks=1) -> (Tensor loss, "
      "Tensor grad_embeddings, Tensor grad_uncertainty, Tensor grad_proxies, Tensor value_flags)");
  m.def(
      "proxy_nca_loss(Tensor embeddings, Tensor proxies, Tensor labels, float scale, float smoothing, "
      "bool exclude_positive, int value_checks=1, int centers_per_class=1, int center_aggregation=0, "
      "float center_gamma=1.0, int margin_type=0, float margin=0.0) -> (Tensor loss, Tensor grad_embeddings, "
      "Tensor grad_proxies, Tensor value_flags)");
  m.def(
      "proxy_nca_shard_row_stats(Tensor embeddings, Tensor proxies, Tensor labels, float scale, "
      "bool exclude_positive, int class_offset, int num_classes, int value_checks=1, int centers_per_class=1, "
      "int center_aggregation=0, float center_gamma=1.0, int margin_type=0, float margin=0.0) -> Tensor");
  m.def(
      "proxy_nca_shard_loss_and_grads(Tensor embeddings, Tensor proxies, Tensor labels, Tensor row_stats, "
      "float scale, float smoothing, bool exclude_positive, int class_offset, int num_classes, "
      "int value_checks=1, int centers_per_class=1, int center_aggregation=0, float center_gamma=1.0, "
      "int margin_type=0, float margin=0.0) -> (Tensor loss, Tensor grad_embeddings, Tensor grad_proxies, "
      "Tensor value_flags)");
}

#define DMLFAST_IMPL_ALL_OPS(m)                                                        \
  m.impl("proxy_anchor_loss", &dmlfast::proxy_anchor_loss);                           \
  m.impl("proxy_nca_loss", &dmlfast::proxy_nca_loss);                                 \
  m.impl("idml_proxy_anchor_loss", &dmlfast::idml_proxy_anchor_loss);                 \
  m.impl("proxy_nca_shard_row_stats", &dmlfast::proxy_nca_shard_row_stats);           \
  m.impl("proxy_nca_shard_loss_and_grads", &dmlfast::proxy_nca_shard_loss_and_grads);

TORCH_LIBRARY_IMPL(dmlfast, CPU, m) { DMLFAST_IMPL_ALL_OPS(m) }

#ifdef DMLFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dmlfast, CUDA, m) { DMLFAST_IMPL_ALL_OPS(m) }
#endif

namespace dmlfast {
namespace {

// Threads of ScaleUnlessOne's grid-stride loop: enough to stream a GPU's memory; on the CPU one,
// which walks the tensor in order.
constexpr int64_t kScaleThreadsCuda = int64_t{1} << 20;

// tensor *= factor, skipped on the device when factor (a one-element tensor) is exactly 1.
void scale_unless_one(const at::Tensor& tensor, const at::Tensor& factor) {
  TORCH_CHECK_VALUE(tensor.is_contiguous() && factor.numel() == 1 && factor.device() == tensor.device(),
                    "scale_unless_one_: expected a contiguous tensor and a one-element factor on its device, got ",
                    describe(tensor), " and ", describe(factor));
  const c10::DeviceGuard guard(tensor.device());
  const int64_t n = tensor.numel();
  const int64_t threads = tensor.is_cuda() ? std::min(n, kScaleThreadsCuda) : std::min<int64_t>(n, 1);
  with_storage_type(tensor.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    using F = std::conditional_t<std::is_same_v<E, double>, double, float>;
    const at::Tensor f = factor.to(c10::CppTypeToScalarType<F>::value).contiguous();
    launch(tensor, threads, ScaleUnlessOne<E, F>{data_as<E>(tensor), n, threads, const_data_as<F>(f)});
  });
}

void raise_for_flags(const std::string& op, const at::Tensor& flags, const at::Tensor& embeddings,
                     const at::Tensor& proxies, const at::Tensor& labels, const std::optional<at::Tensor>& uncertainty,
                     int64_t num_classes) {
  raise_for_value_flags(flags, {op.c_str(), embeddings, proxies, labels, uncertainty.value_or(at::Tensor()), num_classes});
}

void override_tile_plan(int64_t tile_columns, int64_t rows_per_group, int64_t slice_columns, int64_t merge_fan_in,
                        int64_t column_major, int64_t low_precision_gemm, int64_t finish_chunk,
                        int64_t keep_exponentials, int64_t classes_per_thread, int64_t reuse_bytes) {
  set_tile_plan_override({tile_columns, rows_per_group, slice_columns, merge_fan_in, column_major, low_precision_gemm,
                          finish_chunk, keep_exponentials, classes_per_thread, reuse_bytes});
}

}  // namespace
}  // namespace dmlfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "dmlfast's compiled kernels; use the dmlfast package, not this module.";
  module.def("build_info", [] {
    py::dict info;
    info["torch"] = DMLFAST_TORCH_VERSION;
    info["cuda_kernels"] = dmlfast::built_with_cuda();
    info["cuda_arch_list"] = DMLFAST_CUDA_ARCH_LIST;
    info["cpu_vector_exp"] = dmlfast::exp_in_place_is_vectorized();
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
  module.def("raise_for_value_flags", &dmlfast::raise_for_flags,
             "Raise the op's value-check error if a flag is 0 (reads the flags: one host read).", py::arg("op"),
             py::arg("flags"), py::arg("embeddings"), py::arg("proxies"), py::arg("labels"), py::arg("uncertainty"),
             py::arg("num_classes"));
  module.def("scale_unless_one_", &dmlfast::scale_unless_one,
             "tensor *= factor in place, skipped on the device when factor == 1 (no host read).", py::arg("tensor"),
             py::arg("factor"));
  module.def(
      "_exp_run",
      [](const at::Tensor& values) {
        TORCH_CHECK_VALUE(values.device().is_cpu() && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble),
                          "_exp_run: a float32 or float64 CPU tensor expected, got ", values.scalar_type(), " on ",
                          values.device());
        at::Tensor out = values.contiguous().clone();
        if (out.scalar_type() == at::kFloat) {
          dmlfast::exp_in_place(out.data_ptr<float>(), out.numel());
        } else {
          dmlfast::exp_in_place(out.data_ptr<double>(), out.numel());
        }
        return out;
      },
      "Tests only: e^values through the kernels' run exponential (csrc/cpu/exp_runs.h).", py::arg("values"));
  module.def("_override_tile_plan", &dmlfast::override_tile_plan,
             "Tests only: the tile plan's parameters (-1 keeps the device's default).", py::arg("tile_columns") = -1,
             py::arg("rows_per_group") = -1, py::arg("slice_columns") = -1, py::arg("merge_fan_in") = -1,
             py::arg("column_major") = -1, py::arg("low_precision_gemm") = -1, py::arg("finish_chunk") = -1,
             py::arg("keep_exponentials") = -1, py::arg("classes_per_thread") = -1, py::arg("reuse_bytes") = -1);
}
