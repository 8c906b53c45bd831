// CPU kernels: the CUDA launch grid walked block by block, blocks spread over ATen's threads.
#include <ATen/Parallel.h>

#include "../launch.h"

namespace dmlfast {

template <typename Kernel>
void launch_cpu(int64_t threads, const Kernel& kernel) {
  const int64_t blocks = blocks_for(threads, kThreadsPerBlock);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      for (int64_t thread = 0; thread < kThreadsPerBlock; ++thread) kernel(block, thread, kThreadsPerBlock);
    }
  });
}

#define DMLFAST_INSTANTIATE_CPU_LAUNCHER(...) template void launch_cpu<__VA_ARGS__>(int64_t, const __VA_ARGS__&);
DMLFAST_FOR_EACH_KERNEL(DMLFAST_INSTANTIATE_CPU_LAUNCHER)
#undef DMLFAST_INSTANTIATE_CPU_LAUNCHER

}  // namespace dmlfast
