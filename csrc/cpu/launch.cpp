// CPU kernels: the CUDA launch grid walked block by block, blocks spread over ATen's threads.
#include <ATen/Parallel.h>

#include "../launch.h"

namespace dmlfast {
namespace {

template <typename Args, void (*Fn)(int64_t, int64_t, int64_t, const Args&)>
void walk_grid(int64_t threads, const Args& args) {
  const int64_t blocks = blocks_for(threads, kThreadsPerBlock);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      for (int64_t thread = 0; thread < kThreadsPerBlock; ++thread) {
        Fn(block, thread, kThreadsPerBlock, args);
      }
    }
  });
}

}  // namespace

#define DMLFAST_DEFINE_CPU_LAUNCHER(Args, fn) \
  void launch_cpu(int64_t threads, const Args& args) { walk_grid<Args, fn>(threads, args); }
DMLFAST_FOR_EACH_KERNEL(DMLFAST_DEFINE_CPU_LAUNCHER)
#undef DMLFAST_DEFINE_CPU_LAUNCHER

}  // namespace dmlfast
