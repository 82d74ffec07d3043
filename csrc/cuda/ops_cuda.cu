// The CUDA runtime under the kernels of kernels.cuh, and their registration for the CUDA
// dispatch key of the ops (schemas in csrc/ops.cpp): the current device and stream, the
// launch's table uploaded with one asynchronous copy, every launch checked.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"

#include <cstring>
#include <utility>
#include <vector>

namespace adahessian {
namespace cuda {
namespace {

struct CudaRuntime {
  static constexpr const char* kDevice = "CUDA";
  static bool accepts(const Tensor& t) { return t.is_cuda(); }
  using Guard = c10::cuda::CUDAGuard;

  // The host table (metas, then chunks) copied to the device in one asynchronous copy
  // from pinned memory; the caching host allocator keeps the staging buffer alive until
  // the copy has run, and the device buffer is reused only after the launch, in stream
  // order.
  template <typename Meta>
  struct Table {
    Tensor buffer;
    const Meta* metas;
    const Chunk* chunks;
    int64_t num_chunks;

    Table(const std::vector<Meta>& m, const std::vector<Chunk>& c, const at::Device& device) {
      const size_t meta_bytes = (m.size() * sizeof(Meta) + alignof(Chunk) - 1) / alignof(Chunk) * alignof(Chunk);
      const auto bytes = static_cast<int64_t>(meta_bytes + c.size() * sizeof(Chunk));
      Tensor staging = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
      std::memcpy(staging.data_ptr(), m.data(), m.size() * sizeof(Meta));
      std::memcpy(static_cast<char*>(staging.data_ptr()) + meta_bytes, c.data(), c.size() * sizeof(Chunk));
      buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
      buffer.copy_(staging, /*non_blocking=*/true);
      metas = reinterpret_cast<const Meta*>(buffer.const_data_ptr());
      chunks = reinterpret_cast<const Chunk*>(static_cast<const char*>(buffer.const_data_ptr()) + meta_bytes);
      num_chunks = static_cast<int64_t>(c.size());
    }
  };

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
