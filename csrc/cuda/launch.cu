// CUDA kernels: each is a shell that hands its launch coordinates to the shared thread function.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "../launch.h"

namespace dmlfast {
namespace {

template <typename Args, void (*Fn)(int64_t, int64_t, int64_t, const Args&)>
__global__ void grid_kernel(Args args) {
  Fn(blockIdx.x, threadIdx.x, blockDim.x, args);
}

template <typename Args, void (*Fn)(int64_t, int64_t, int64_t, const Args&)>
void launch_grid(int64_t threads, const Args& args) {
  const int64_t blocks = blocks_for(threads, kThreadsPerBlock);
  TORCH_CHECK(blocks <= 2147483647LL, "dmlfast: too many CUDA threads for one launch: ", threads);
  grid_kernel<Args, Fn><<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

#define DMLFAST_DEFINE_CUDA_LAUNCHER(Args, fn) \
  void launch_cuda(int64_t threads, const Args& args) { launch_grid<Args, fn>(threads, args); }
DMLFAST_FOR_EACH_KERNEL(DMLFAST_DEFINE_CUDA_LAUNCHER)
#undef DMLFAST_DEFINE_CUDA_LAUNCHER

bool built_with_cuda() { return true; }

}  // namespace dmlfast
