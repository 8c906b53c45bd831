// Launchers for the kernels of proxy_loss_math.h, on either device.
//
// `launch(on, threads, kernel)` runs `threads` logical CUDA threads (rounded up to whole blocks of
// kThreadsPerBlock) on the device of tensor `on`: a CUDA kernel on the current stream there, or
// the same grid walked block by block on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include "proxy_loss_math.h"

namespace dmlfast {

// Every kernel type the drivers launch; each launcher file instantiates its launcher for these.
// The list is variadic (X(...)) because template argument lists hold commas.
#define DMLFAST_KERNELS_OF_ACC(X, T)                                                          \
  X(PositivePairs<T>) X(PositiveScatter<T>) X(IdmlPositive<T>)                               \
  X(ColumnScales<T>) X(AnchorPositive<T>) X(AnchorPositiveFinish<T>) X(AnchorPartial<T>)     \
  X(AnchorMerge<T>) X(AnchorLoss<T>) X(ColumnSum<T>) X(IdmlPairs<T>) X(SoftmaxSlices<T>)      \
  X(SoftmaxMerge<T>) X(SoftmaxRowUpdate<T>) X(SoftmaxLoss<T>) X(SoftmaxExpScales<T>)
// T with each dtype the tile GEMMs read (O) or the embeddings' gradient is written in.
#define DMLFAST_KERNELS_OF_ACC_STORE(X, T, O) \
  X(AnchorApply<T, O>) X(IdmlChain<T, O>) X(SoftmaxGrad<T, O>) X(SoftmaxGradRuns<T, O>) X(EmbeddingBackward<T, O>) \
  X(ProxyGradFinish<T, O>)

#define DMLFAST_FOR_EACH_KERNEL(X)                                                                      \
  DMLFAST_KERNELS_OF_ACC(X, float)                                                                      \
  DMLFAST_KERNELS_OF_ACC(X, double)                                                                     \
  DMLFAST_KERNELS_OF_ACC_STORE(X, float, float)                                                         \
  DMLFAST_KERNELS_OF_ACC_STORE(X, float, c10::BFloat16)                                                 \
  DMLFAST_KERNELS_OF_ACC_STORE(X, float, c10::Half)                                                     \
  DMLFAST_KERNELS_OF_ACC_STORE(X, double, double)                                                       \
  X(EmbeddingRows<float, float, float>) X(EmbeddingRows<double, double, double>)                        \
  X(EmbeddingRows<c10::BFloat16, float, float>) X(EmbeddingRows<c10::BFloat16, float, c10::BFloat16>)   \
  X(EmbeddingRows<c10::Half, float, float>) X(EmbeddingRows<c10::Half, float, c10::Half>)               \
  X(ScaleUnlessOne<float, float>) X(ScaleUnlessOne<double, double>)                                     \
  X(ScaleUnlessOne<c10::BFloat16, float>) X(ScaleUnlessOne<c10::Half, float>)

template <typename Kernel>
void launch_cpu(int64_t threads, const Kernel& kernel);
template <typename Kernel>
void launch_cuda(int64_t threads, const Kernel& kernel);

template <typename Kernel>
void launch(const at::Tensor& on, int64_t threads, const Kernel& kernel) {
  if (threads <= 0) return;
  if (on.is_cuda()) {
    launch_cuda(threads, kernel);
  } else {
    launch_cpu(threads, kernel);
  }
}

// Whether this build has the CUDA kernels (the CUDA launchers raise otherwise).
bool built_with_cuda();

}  // namespace dmlfast
