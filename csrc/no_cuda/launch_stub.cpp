// Compiled instead of csrc/cuda/ when the CUDA kernels are not built: CUDA launches are errors.
#include <c10/util/Exception.h>

#include "../launch.h"

namespace dmlfast {

template <typename Kernel>
void launch_cuda(int64_t, const Kernel&) {
  TORCH_CHECK(false, "dmlfast was built without its CUDA kernels; reinstall it with a CUDA build of torch "
                     "and nvcc available (see README, 'Build options')");
}

#define DMLFAST_INSTANTIATE_MISSING_CUDA_LAUNCHER(...) template void launch_cuda<__VA_ARGS__>(int64_t, const __VA_ARGS__&);
DMLFAST_FOR_EACH_KERNEL(DMLFAST_INSTANTIATE_MISSING_CUDA_LAUNCHER)
#undef DMLFAST_INSTANTIATE_MISSING_CUDA_LAUNCHER

bool built_with_cuda() { return false; }

}  // namespace dmlfast
