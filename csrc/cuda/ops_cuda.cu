// CUDA kernels of the adahessian ops (schemas in csrc/ops.cpp), registered for the CUDA
// dispatch key. Multi-tensor apply: the host lays out a table of tensors and of chunks
// (whole conv-kernel groups each), uploads it with one asynchronous copy, and one launch
// per dtype covers every tensor, one block per chunk. The per-element math is the shared
// header's (adahessian/math.h), unchanged.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <adahessian/host.h>
#include <adahessian/math.h>

#include <cstring>
#include <optional>
#include <vector>

namespace adahessian {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
// Elements per lane of the vectorised path: 16-byte accesses for float32 parameters.
constexpr int kPack = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ inline void load(T (&dst)[N], const T* src) {
  const auto pack = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = pack.v[k];
}

template <int N, typename T>
__device__ inline void store(T* dst, const T (&src)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = src[k];
  *reinterpret_cast<Pack<T, N>*>(dst) = pack;
}

// One chunk of one tensor: the unit of work of a block.
struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

// Copies the host table (metas, then chunks) to the device in one asynchronous copy
// from pinned memory; the caching host allocator keeps the staging buffer alive until
// the copy has run.
template <typename Meta>
struct DeviceTable {
  Tensor buffer;
  const Meta* metas;
  const Chunk* chunks;
  int64_t num_chunks;

  DeviceTable(const std::vector<Meta>& m, const std::vector<Chunk>& c, const at::Device& device) {
    const size_t meta_bytes = (m.size() * sizeof(Meta) + alignof(Chunk) - 1) / alignof(Chunk) * alignof(Chunk);
    const size_t bytes = meta_bytes + c.size() * sizeof(Chunk);
    Tensor staging = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(staging.data_ptr(), m.data(), m.size() * sizeof(Meta));
    std::memcpy(static_cast<char*>(staging.data_ptr()) + meta_bytes, c.data(), c.size() * sizeof(Chunk));
    buffer = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
    buffer.copy_(staging, /*non_blocking=*/true);
    metas = reinterpret_cast<const Meta*>(buffer.const_data_ptr());
    chunks = reinterpret_cast<const Chunk*>(static_cast<const char*>(buffer.const_data_ptr()) + meta_bytes);
    num_chunks = static_cast<int64_t>(c.size());
  }
};

std::vector<Chunk> chunks_of(const std::vector<WorkItem>& items) {
  std::vector<Chunk> chunks;
  chunks.reserve(items.size());
  for (const auto& w : items) chunks.push_back({static_cast<int32_t>(w.tensor), w.begin, w.end});
  return chunks;
}

// Splits the tensors into chunks of whole groups, uploads the table and calls
// launch(table, stream) to start one block per chunk on the current stream.
template <typename Meta, typename Launch>
void launch_over_chunks(const std::vector<Meta>& metas, const std::vector<int64_t>& numel,
                        const std::vector<int64_t>& group, const at::Device& device, const Launch& launch) {
  const auto chunks = chunks_of(work_items(numel, group));
  if (chunks.empty()) return;
  const DeviceTable<Meta> table(metas, chunks, device);
  launch(table, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_cuda(const Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda(), "adahessian: ", what, " must be CUDA tensors");
}

// ------------------------------------------------------------------------ rademacher_

template <typename scalar_t>
struct FillMeta {
  scalar_t* out;
  uint32_t key;
};

template <typename scalar_t>
__global__ void rademacher_kernel(const FillMeta<scalar_t>* metas, const Chunk* chunks) {
  const Chunk ch = chunks[blockIdx.x];
  const FillMeta<scalar_t> t = metas[ch.tensor];
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
    t.out[i] = rademacher_sign<scalar_t>(rademacher_base(t.key, i), i);
  }
}

void rademacher_cuda(at::TensorList out, at::IntArrayRef keys) {
  TORCH_CHECK(out.size() == keys.size(), "adahessian::rademacher_: ", out.size(), " tensors but ", keys.size(),
              " keys");
  if (out.empty()) return;
  const c10::cuda::CUDAGuard guard(out[0].device());
  ContiguousViews views;
  for (const auto dtype : dtypes_of(out)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rademacher_", [&] {
      std::vector<FillMeta<scalar_t>> metas;
      std::vector<int64_t> numel;
      for (size_t i = 0; i < out.size(); ++i) {
        if (out[i].scalar_type() != dtype) continue;
        check_cuda(out[i], "out");
        metas.push_back({views.write(out[i]).data_ptr<scalar_t>(), checked_key(keys[i])});
        numel.push_back(out[i].numel());
      }
      launch_over_chunks(metas, numel, std::vector<int64_t>(numel.size(), 1), out[0].device(),
                         [](const auto& table, cudaStream_t stream) {
                           rademacher_kernel<<<table.num_chunks, kThreads, 0, stream>>>(table.metas, table.chunks);
                         });
    });
  }
  views.finish();
}

// -------------------------------------------------------------- accumulate_hessian_

template <typename scalar_t>
struct AccumulateMeta {
  at::opmath_type<scalar_t>* partial_sum;
  const scalar_t* hz;
  uint32_t key;
};

template <typename scalar_t>
__global__ void accumulate_kernel(const AccumulateMeta<scalar_t>* metas, const Chunk* chunks) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Chunk ch = chunks[blockIdx.x];
  const AccumulateMeta<scalar_t> t = metas[ch.tensor];
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
    const opmath_t z = rademacher_sign<opmath_t>(rademacher_base(t.key, i), i);
    t.partial_sum[i] = hessian_estimate<opmath_t>(z, t.hz[i], t.partial_sum[i], 1, 1);
  }
}

void accumulate_hessian_cuda(at::TensorList partial_sums, at::TensorList hzs, at::IntArrayRef keys) {
  TORCH_CHECK(partial_sums.size() == hzs.size() && hzs.size() == keys.size(),
              "adahessian::accumulate_hessian_: lists of different lengths");
  if (hzs.empty()) return;
  const c10::cuda::CUDAGuard guard(hzs[0].device());
  ContiguousViews views;
  for (const auto dtype : dtypes_of(hzs)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "accumulate_hessian_", [&] {
      std::vector<AccumulateMeta<scalar_t>> metas;
      std::vector<int64_t> numel;
      for (size_t i = 0; i < hzs.size(); ++i) {
        if (hzs[i].scalar_type() != dtype) continue;
        check_cuda(hzs[i], "hzs");
        check_like(partial_sums[i], hzs[i], at::toOpMathType(dtype), "partial_sums");
        metas.push_back({views.write(partial_sums[i]).data_ptr<at::opmath_type<scalar_t>>(),
                         views.read(hzs[i]).const_data_ptr<scalar_t>(), checked_key(keys[i])});
        numel.push_back(hzs[i].numel());
      }
      launch_over_chunks(metas, numel, std::vector<int64_t>(numel.size(), 1), hzs[0].device(),
                         [](const auto& table, cudaStream_t stream) {
                           accumulate_kernel<<<table.num_chunks, kThreads, 0, stream>>>(table.metas, table.chunks);
                         });
    });
  }
  views.finish();
}

// ---------------------------------------------------------------------- fused_step_

template <typename scalar_t>
struct StepMeta {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* param;
  const scalar_t* grad;
  opmath_t* exp_avg;
  opmath_t* exp_hessian_diag_sq;
  opmath_t* hessian;            // D kept for later steps, or null
  const scalar_t* hz;           // null on steps that reuse the kept D
  const opmath_t* partial_sum;  // null when n_samples == 1
  uint32_t key;
  bool average;                 // conv-kernel averaging (|D| averaged over groups of `group`)
  int32_t group;
  bool vectorised;              // every pointer 16-byte aligned
  StepCoefficients<opmath_t> coefficients;
};

// Everything a lane needs, read once per launch.
template <typename opmath_t>
struct StepScalars {
  opmath_t n_samples;
  const float* grad_scale;  // GradScaler's scale on the device, or null
};

// D at element i: this step's estimate, or the kept one.
template <typename scalar_t, typename opmath_t>
__device__ inline opmath_t estimate_at(const StepMeta<scalar_t>& t, int64_t i, opmath_t n_samples, opmath_t inv_scale) {
  if (t.hz == nullptr) return t.hessian[i];
  const opmath_t z = rademacher_sign<opmath_t>(rademacher_base(t.key, i), i);
  const opmath_t sum = t.partial_sum ? t.partial_sum[i] : opmath_t(0);
  return hessian_estimate<opmath_t>(z, static_cast<opmath_t>(t.hz[i]), sum, n_samples, inv_scale);
}

template <Power power, typename scalar_t, typename opmath_t>
__device__ inline void update_at(const StepMeta<scalar_t>& t, int64_t i, opmath_t d, const StepCoefficients<opmath_t>& c) {
  if (t.hz != nullptr && t.hessian != nullptr) t.hessian[i] = d;
  opmath_t p = static_cast<opmath_t>(t.param[i]), m = t.exp_avg[i], v = t.exp_hessian_diag_sq[i];
  adahessian_update<power>(p, m, v, static_cast<opmath_t>(t.grad[i]), d, c);
  t.param[i] = static_cast<scalar_t>(p);  // the one rounding of a low-precision parameter
  t.exp_avg[i] = m;
  t.exp_hessian_diag_sq[i] = v;
}

// kPack consecutive elements with 16-byte-aligned (for float32) loads and stores.
template <Power power, typename scalar_t, typename opmath_t>
__device__ inline void update_pack(const StepMeta<scalar_t>& t, int64_t i, opmath_t n_samples,
                                   const StepCoefficients<opmath_t>& c) {
  scalar_t p[kPack], g[kPack];
  opmath_t m[kPack], v[kPack], d[kPack];
  load(p, t.param + i);
  load(g, t.grad + i);
  load(m, t.exp_avg + i);
  load(v, t.exp_hessian_diag_sq + i);
  if (t.hz != nullptr) {
    scalar_t h[kPack];
    opmath_t s[kPack] = {};
    load(h, t.hz + i);
    if (t.partial_sum) load(s, t.partial_sum + i);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const opmath_t z = rademacher_sign<opmath_t>(rademacher_base(t.key, i + k), i + k);
      d[k] = hessian_estimate<opmath_t>(z, static_cast<opmath_t>(h[k]), s[k], n_samples, c.inv_scale);
    }
    if (t.hessian) store(t.hessian + i, d);
  } else {
    load(d, t.hessian + i);
  }
#pragma unroll
  for (int k = 0; k < kPack; ++k) {
    opmath_t pk = static_cast<opmath_t>(p[k]);
    adahessian_update<power>(pk, m[k], v[k], static_cast<opmath_t>(g[k]), d[k], c);
    p[k] = static_cast<scalar_t>(pk);
  }
  store(t.param + i, p);
  store(t.exp_avg + i, m);
  store(t.exp_hessian_diag_sq + i, v);
}

template <Power power, typename scalar_t>
__global__ void fused_step_kernel(const StepMeta<scalar_t>* metas, const Chunk* chunks,
                                  StepScalars<at::opmath_type<scalar_t>> scalars, const float* found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (found_inf != nullptr && *found_inf != 0.f) return;  // GradScaler skips this step
  const Chunk ch = chunks[blockIdx.x];
  const StepMeta<scalar_t> t = metas[ch.tensor];
  StepCoefficients<opmath_t> c = t.coefficients;
  if (scalars.grad_scale != nullptr) c.inv_scale = opmath_t(1) / static_cast<opmath_t>(*scalars.grad_scale);

  if (t.average) {
    // Conv-kernel averaging: a lane owns whole kh*kw groups (chunks hold whole groups):
    // the mean of |D| over the group (sum, then divide, as torch.mean does), then the
    // group's updates.
    for (int64_t g = ch.begin + int64_t(threadIdx.x) * t.group; g < ch.end; g += int64_t(blockDim.x) * t.group) {
      opmath_t sum = 0;
      for (int64_t i = g; i < g + t.group; ++i) sum += ::fabs(estimate_at(t, i, scalars.n_samples, c.inv_scale));
      const opmath_t d = sum / static_cast<opmath_t>(t.group);
      for (int64_t i = g; i < g + t.group; ++i) update_at<power>(t, i, d, c);
    }
    return;
  }
  int64_t i = ch.begin;
  if (t.vectorised) {  // chunk starts are multiples of kPack: every pack is aligned
    for (i = ch.begin + int64_t(threadIdx.x) * kPack; i + kPack <= ch.end; i += int64_t(blockDim.x) * kPack) {
      update_pack<power>(t, i, scalars.n_samples, c);
    }
    i = ch.begin + (ch.end - ch.begin) / kPack * kPack;  // the tail of the tensor's last chunk
  }
  for (i += threadIdx.x; i < ch.end; i += blockDim.x) {
    update_at<power>(t, i, estimate_at(t, i, scalars.n_samples, c.inv_scale), c);
  }
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_hessian_diag_sqs, at::TensorList hessians, at::TensorList hzs,
                     at::TensorList partial_sums, at::IntArrayRef keys, at::IntArrayRef steps, double lr,
                     double beta1, double beta2, double eps, double weight_decay, double hessian_power,
                     int64_t n_samples, bool average_conv_kernel, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf) {
  check_step_arguments(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, partial_sums, keys, steps,
                       n_samples);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool hessian_step = !hzs.empty();
  const Power power = power_of(hessian_power);
  const float* scale = nullptr;
  const float* inf = nullptr;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->is_cuda() && grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
                "adahessian::fused_step_: grad_scale must be a one-element float32 CUDA tensor");
    scale = grad_scale->const_data_ptr<float>();
  }
  if (found_inf.has_value()) {
    TORCH_CHECK(found_inf->is_cuda() && found_inf->scalar_type() == at::kFloat && found_inf->numel() == 1,
                "adahessian::fused_step_: found_inf must be a one-element float32 CUDA tensor");
    inf = found_inf->const_data_ptr<float>();
  }

  ContiguousViews views;
  for (const auto dtype : dtypes_of(params)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_step_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      std::vector<StepMeta<scalar_t>> metas;
      std::vector<int64_t> numel, group;
      for (size_t i = 0; i < params.size(); ++i) {
        const Tensor& p = params[i];
        if (p.scalar_type() != dtype) continue;
        check_cuda(p, "params");
        check_step_tensors(i, params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, partial_sums);
        StepMeta<scalar_t> t{};
        t.param = views.write(p).data_ptr<scalar_t>();
        t.grad = views.read(grads[i]).const_data_ptr<scalar_t>();
        t.exp_avg = views.write(exp_avgs[i]).data_ptr<opmath_t>();
        t.exp_hessian_diag_sq = views.write(exp_hessian_diag_sqs[i]).data_ptr<opmath_t>();
        if (!hessians.empty()) {
          t.hessian = hessian_step ? views.write(hessians[i]).data_ptr<opmath_t>()
                                   : const_cast<opmath_t*>(views.read(hessians[i]).const_data_ptr<opmath_t>());
        }
        if (hessian_step) {
          t.hz = views.read(hzs[i]).const_data_ptr<scalar_t>();
          t.key = checked_key(keys[i]);
          if (!partial_sums.empty()) t.partial_sum = views.read(partial_sums[i]).const_data_ptr<opmath_t>();
        }
        t.average = average_conv_kernel && p.dim() == 4;  // 1x1 kernels too: D becomes |D|
        t.group = static_cast<int32_t>(averaging_group(p, average_conv_kernel));
        t.vectorised = aligned(t.param) && aligned(t.grad) && aligned(t.exp_avg) &&
                       aligned(t.exp_hessian_diag_sq) && (!t.hessian || aligned(t.hessian)) &&
                       (!t.hz || aligned(t.hz)) && (!t.partial_sum || aligned(t.partial_sum));
        const auto c = step_coefficients(steps[i], lr, beta1, beta2, eps, weight_decay, hessian_power, 1.0);
        t.coefficients = {opmath_t(c.weight_decay_factor), opmath_t(c.beta1), opmath_t(c.one_minus_beta1),
                          opmath_t(c.beta2), opmath_t(c.one_minus_beta2), opmath_t(c.bias_correction2),
                          opmath_t(c.neg_step_size), opmath_t(c.eps), opmath_t(c.exponent), opmath_t(1)};
        metas.push_back(t);
        numel.push_back(p.numel());
        group.push_back(t.group);
      }
      const StepScalars<opmath_t> scalars{static_cast<opmath_t>(n_samples), scale};
      launch_over_chunks(metas, numel, group, params[0].device(), [&](const auto& table, cudaStream_t stream) {
        dispatch_power(power, [&](auto p) {
          fused_step_kernel<decltype(p)::value>
              <<<table.num_chunks, kThreads, 0, stream>>>(table.metas, table.chunks, scalars, inf);
        });
      });
    });
  }
  views.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(adahessian, CUDA, m) {
  m.impl("rademacher_", &rademacher_cuda);
  m.impl("accumulate_hessian_", &accumulate_hessian_cuda);
  m.impl("fused_step_", &fused_step_cuda);
}

}  // namespace adahessian
