// Compiled instead of csrc/cuda/ when the CUDA kernels are not built: CUDA launches are errors.
#include <c10/util/Exception.h>

#include "../launch.h"

namespace dmlfast {

#define DMLFAST_DEFINE_MISSING_CUDA_LAUNCHER(Args, fn)                                         \
  void launch_cuda(int64_t, const Args&) {                                                     \
    TORCH_CHECK(false, "dmlfast was built without its CUDA kernels; reinstall it with a CUDA " \
                       "build of torch and nvcc available (see README, 'Build options')");      \
  }
DMLFAST_FOR_EACH_KERNEL(DMLFAST_DEFINE_MISSING_CUDA_LAUNCHER)
#undef DMLFAST_DEFINE_MISSING_CUDA_LAUNCHER

bool built_with_cuda() { return false; }

}  // namespace dmlfast
