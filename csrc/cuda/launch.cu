// CUDA kernels: each is a shell that hands its launch coordinates to the kernel's thread function.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../launch.h"

namespace dmlfast {
namespace {

template <typename Kernel>
__global__ void __launch_bounds__(kThreadsPerBlock) grid_kernel(Kernel kernel) {
  kernel(blockIdx.x, threadIdx.x, blockDim.x);
}

}  // namespace

template <typename Kernel>
void launch_cuda(int64_t threads, const Kernel& kernel) {
  const int64_t blocks = blocks_for(threads, kThreadsPerBlock);
  TORCH_CHECK(blocks <= 2147483647LL, "dmlfast: too many CUDA threads for one launch: ", threads);
  grid_kernel<Kernel><<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(kernel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DMLFAST_INSTANTIATE_CUDA_LAUNCHER(...) template void launch_cuda<__VA_ARGS__>(int64_t, const __VA_ARGS__&);
DMLFAST_FOR_EACH_KERNEL(DMLFAST_INSTANTIATE_CUDA_LAUNCHER)
#undef DMLFAST_INSTANTIATE_CUDA_LAUNCHER

bool built_with_cuda() { return true; }

}  // namespace dmlfast
