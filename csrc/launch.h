// One launcher per thread function of proxy_loss_math.h, for each device.
//
// `launch(on, threads, args)` runs `threads` logical CUDA threads (rounded up to whole blocks of
// kThreadsPerBlock) on the device of tensor `on`: a CUDA kernel on the current stream there, or
// the same grid walked block by block on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include "proxy_loss_math.h"

namespace dmlfast {

// (argument struct, thread function) of every kernel, for float and double accumulation where
// the math depends on it.
#define DMLFAST_FOR_EACH_KERNEL_T(X, T)                     \
  X(AnchorNegativeArgs<T>, anchor_negative_column_thread<T>) \
  X(AnchorPositiveArgs<T>, anchor_positive_thread<T>)        \
  X(PositiveScatterArgs<T>, positive_scatter_thread<T>)      \
  X(IdmlPositiveArgs<T>, idml_positive_thread<T>)            \
  X(IdmlTileArgs<T>, idml_similarity_column_thread<T>)       \
  X(IdmlChainArgs<T>, idml_chain_column_thread<T>)           \
  X(SoftmaxTileArgs<T>, softmax_chunk_reduce_thread<T>)      \
  X(SoftmaxGradArgs<T>, softmax_chunk_grad_thread<T>)
#define DMLFAST_FOR_EACH_KERNEL(X)                                          \
  DMLFAST_FOR_EACH_KERNEL_T(X, float) DMLFAST_FOR_EACH_KERNEL_T(X, double) \
  X(SoftmaxCombineArgs, softmax_row_combine_thread)

#define DMLFAST_DECLARE_LAUNCHERS(Args, fn)             \
  void launch_cpu(int64_t threads, const Args& args); \
  void launch_cuda(int64_t threads, const Args& args);
DMLFAST_FOR_EACH_KERNEL(DMLFAST_DECLARE_LAUNCHERS)
#undef DMLFAST_DECLARE_LAUNCHERS

template <typename Args>
void launch(const at::Tensor& on, int64_t threads, const Args& args) {
  if (threads <= 0) return;
  if (on.is_cuda()) {
    launch_cuda(threads, args);
  } else {
    launch_cpu(threads, args);
  }
}

// Whether this build has the CUDA kernels (the CUDA launchers raise otherwise).
bool built_with_cuda();

}  // namespace dmlfast
