// Operator schemas (TORCH_LIBRARY), their CPU/CUDA kernels, and the Python module dmlfast._C.
// Fake (meta) tensors, autograd and autocast behaviour are registered in dmlfast/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "fused_losses.h"
#include "launch.h"

#ifndef DMLFAST_TORCH_VERSION
#error "DMLFAST_TORCH_VERSION must be defined by the build (the torch version compiled against)"
#endif
#ifndef DMLFAST_CUDA_ARCH_LIST
#define DMLFAST_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(dmlfast, m) {
  m.def(
      "proxy_anchor_loss(Tensor embeddings, Tensor proxies, Tensor labels, float margin, "
      "float alpha, Tensor? isa_class_params=None, bool isa_filter_positives=False, "
      "int class_offset=0, int num_classes=-1) -> "
      "(Tensor loss, Tensor grad_embeddings, Tensor grad_proxies)");
  m.def(
      "idml_proxy_anchor_loss(Tensor embeddings, Tensor uncertainty, Tensor proxies, "
      "Tensor labels, float margin, float alpha, int class_offset=0, int num_classes=-1) -> "
      "(Tensor loss, Tensor grad_embeddings, Tensor grad_uncertainty, Tensor grad_proxies)");
  m.def(
      "proxy_nca_loss(Tensor embeddings, Tensor proxies, Tensor labels, float scale, "
      "float smoothing, bool exclude_positive) -> (Tensor loss, Tensor grad_embeddings, "
      "Tensor grad_proxies)");
  m.def(
      "proxy_nca_shard_row_stats(Tensor embeddings, Tensor proxies, Tensor labels, float scale, "
      "bool exclude_positive, int class_offset, int num_classes) -> Tensor");
  m.def(
      "proxy_nca_shard_loss_and_grads(Tensor embeddings, Tensor proxies, Tensor labels, "
      "Tensor row_stats, float scale, float smoothing, bool exclude_positive, int class_offset, "
      "int num_classes) -> (Tensor loss, Tensor grad_embeddings, Tensor grad_proxies)");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "dmlfast's compiled kernels; use the dmlfast package, not this module.";
  module.def("build_info", [] {
    pybind11::dict info;
    info["torch"] = DMLFAST_TORCH_VERSION;
    info["cuda_kernels"] = dmlfast::built_with_cuda();
    info["cuda_arch_list"] = DMLFAST_CUDA_ARCH_LIST;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
}
