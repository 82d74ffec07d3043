// The CUDA runtime under the kernels of kernels.cuh, and their registration for the CUDA
// dispatch key of the ops (schemas in csrc/ops.cpp): the current device and stream, the
// launch's table uploaded with one asynchronous copy, every launch checked.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"

#include <vector>

namespace adahessian {
namespace cuda {
namespace {

struct CudaRuntime {
  static constexpr const char* kDevice = "CUDA";
  static bool accepts(const Tensor& t) { return t.is_cuda(); }

  // The device guard of a call, which also refuses CUDA-graph capture: a replay would
  // rerun the table's copy from a pinned host buffer that has since been reused, with
  // the step counts frozen at capture.
  struct Guard {
    c10::cuda::CUDAGuard device;
    explicit Guard(const at::Device& d) : device(d) {
      TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                  "adahessian: the fused CUDA kernels cannot be captured in a CUDA graph (each call copies its "
                  "launch table from host memory, and the step counts would be frozen into the graph): call "
                  "optimizer.step() outside torch.cuda.graph() capture.");
    }
  };

  // Pinned: the table's copy to the device is asynchronous, and the caching host
  // allocator keeps the staging buffer alive until it has run. The device buffer is
  // reused only after the launch, in stream order.
  static at::TensorOptions staging() { return at::TensorOptions().dtype(at::kByte).pinned_memory(true); }
  static Tensor upload(const Tensor& staging, const at::Device& device) {
    Tensor buffer = at::empty(staging.sizes(), at::TensorOptions().dtype(at::kByte).device(device));
    buffer.copy_(staging, /*non_blocking=*/true);
    return buffer;
  }

  template <typename... Params, typename... Args>
  static void launch(void (*kernel)(Params...), int64_t blocks, const Args&... args) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(adahessian, CUDA, m) {
  m.impl("rademacher_", &rademacher<CudaRuntime>);
  m.impl("accumulate_hessian_", &accumulate_hessian<CudaRuntime>);
  m.impl("fused_step_", &fused_step<CudaRuntime>);
}

}  // namespace cuda
}  // namespace adahessian
