// Runs the CUDA kernels of csrc/cuda/kernels.cuh on the CPU, for machines without a GPU:
// every block of a launch in turn, and within a block each phase (each_thread) for every
// thread, one after another, before the next phase; __shared__ memory is one static per
// variable (blocks run one at a time). That is the kernels' exact semantics as long as
// threads share data only across phases, which is how kernels.cuh is written; running
// threads in reverse order as well would expose an element that two threads of one
// phase touch. What it cannot check is the CUDA runtime itself (the table's copy to the
// device, streams, alignment faults): tests/test_cuda.py does that on a GPU.
//
// Registered for the CPU key of the ops adahessian_cuda_emulator::*, whose schemas the
// test defines from adahessian's own.
#include <torch/library.h>

#include <cstdint>
#include <vector>

#define __global__
#define __device__
#define __shared__ static
#define ADAHESSIAN_CUDA_EMULATOR

struct EmulatedIndex {
  unsigned x = 0;
};
inline EmulatedIndex blockIdx, blockDim;

namespace adahessian {
namespace cuda {

inline bool reverse_order = false;

template <typename F>
void each_thread(const F& f) {
  for (unsigned k = 0; k < blockDim.x; ++k) f(static_cast<int64_t>(reverse_order ? blockDim.x - 1 - k : k));
}
inline void block_barrier() {}  // each_thread has run every thread already

}  // namespace cuda
}  // namespace adahessian

#include "../csrc/cuda/kernels.cuh"

namespace adahessian {
namespace cuda {
namespace {

struct EmulatedRuntime {
  static constexpr const char* kDevice = "CPU (emulated CUDA)";
  static bool accepts(const Tensor& t) { return t.device().is_cpu(); }
  struct Guard {
    explicit Guard(const at::Device&) {}
  };

  // The table stays where it was built: CPU memory is the emulated device's.
  static at::TensorOptions staging() { return at::TensorOptions().dtype(at::kByte); }
  static Tensor upload(const Tensor& staging, const at::Device&) { return staging; }

  template <typename... Params, typename... Args>
  static void launch(void (*kernel)(Params...), int64_t blocks, const Args&... args) {
    blockDim.x = kThreads;
    for (int64_t b = 0; b < blocks; ++b) {
      blockIdx.x = static_cast<unsigned>(reverse_order ? blocks - 1 - b : b);
      kernel(args...);  // its each_thread phases run every thread
    }
  }
};

void set_reverse_order(bool reverse) { reverse_order = reverse; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(adahessian_cuda_emulator, m) {
  m.def("set_reverse_order(bool reverse) -> ()", &set_reverse_order);
}

TORCH_LIBRARY_IMPL(adahessian_cuda_emulator, CPU, m) {
  m.impl("rademacher_", &rademacher<EmulatedRuntime>);
  m.impl("accumulate_hessian_", &accumulate_hessian<EmulatedRuntime>);
  m.impl("fused_step_", &fused_step<EmulatedRuntime>);
}

}  // namespace cuda
}  // namespace adahessian
