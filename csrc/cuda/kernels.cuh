// The CUDA kernels of the adahessian ops and the host code that feeds them, written
// against a small runtime interface rather than the CUDA runtime itself, so that the same
// code also runs on a CPU under the test suite's emulator (tests/cuda_emulator.cpp).
// ops_cuda.cu supplies the real runtime:
//
//   struct Runtime {
//     static constexpr const char* kDevice;        // "CUDA", for error messages
//     static bool accepts(const at::Tensor&);      // a tensor this runtime can address
//     struct Guard { explicit Guard(at::Device); };  // the call's device; may refuse the call
//     static at::TensorOptions staging();          // host memory a launch's table is built in
//     static at::Tensor upload(const at::Tensor& staging, at::Device);  // the table, on the device
//     static void launch(kernel, int64_t blocks, args...);  // kThreads threads a block
//   };
//
// Multi-tensor apply: the host lays out a table of tensors and of chunks (whole
// conv-kernel groups each), and one launch per dtype covers every tensor, one block per
// chunk. Kernels never read threadIdx themselves: the code of a block is uniform, and
// each_thread(f) runs f(thread) for every thread of the block, a block_barrier()
// separating phases that share __shared__ memory. On a GPU that is plain per-thread
// code with __syncthreads(); the emulator runs each phase for all threads, one after
// another, before the next (no warp shuffles, whose lockstep it could not emulate). The
// per-element math is the shared header's (adahessian/math.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <adahessian/host.h>
#include <adahessian/layout.h>
#include <adahessian/math.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace adahessian {
namespace cuda {

using at::Tensor;

#ifndef ADAHESSIAN_CUDA_EMULATOR
// The thread's part of a phase of the block (see the comment at the top).
template <typename F>
__device__ inline void each_thread(const F& f) {
  f(static_cast<int64_t>(threadIdx.x));
}
__device__ inline void block_barrier() { __syncthreads(); }
#endif

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

// Whether a pack of T may be loaded at p (float64 packs need 32 bytes, not 16).
template <typename T>
bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Pack<T, kPack>) == 0;
}

// One chunk of one tensor: the unit of work of a block.
struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

// A launch's table in one buffer, so that it travels to the device in one copy: the
// metas, then the chunks at the next offset aligned for them. Built in the runtime's
// staging memory (pinned, for an asynchronous copy) and handed to Runtime::upload.
template <typename Runtime, typename Meta>
struct Table {
  Tensor buffer;  // keeps the device copy alive until the launch is queued
  const Meta* metas;
  const Chunk* chunks;
  int64_t num_chunks;

  Table(const std::vector<Meta>& m, const std::vector<Chunk>& c, const at::Device& device)
      : num_chunks(static_cast<int64_t>(c.size())) {
    const size_t chunk_offset = (m.size() * sizeof(Meta) + alignof(Chunk) - 1) / alignof(Chunk) * alignof(Chunk);
    Tensor staging = at::empty({static_cast<int64_t>(chunk_offset + c.size() * sizeof(Chunk))}, Runtime::staging());
    std::memcpy(staging.data_ptr(), m.data(), m.size() * sizeof(Meta));
    std::memcpy(static_cast<char*>(staging.data_ptr()) + chunk_offset, c.data(), c.size() * sizeof(Chunk));
    buffer = Runtime::upload(staging, device);
    metas = static_cast<const Meta*>(buffer.const_data_ptr());
    chunks = reinterpret_cast<const Chunk*>(static_cast<const char*>(buffer.const_data_ptr()) + chunk_offset);
  }
};

// Every tensor of one call: addressable by the runtime and on one device.
template <typename Runtime>
void check_device(const Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(Runtime::accepts(t), "adahessian: ", what, " must be ", Runtime::kDevice, " tensors, got one on ",
              t.device());
  TORCH_CHECK(t.device() == device, "adahessian: the tensors of one call must be on one device: ", what,
              " has one on ", t.device(), ", the first is on ", device);
}

// Splits the tensors into chunks of whole averaging groups (work_items: a chunk's bounds
// are memory offsets, or group indices where groups interleave), uploads the table and
// calls launch(table) to start one block per chunk.
template <typename Runtime, typename Meta, typename Launch>
void launch_over_chunks(const std::vector<Meta>& metas, const std::vector<int64_t>& numel, const at::Device& device,
                        const Launch& launch, const std::vector<Averaging>& averaging = {}) {
  std::vector<Chunk> chunks;
  for (const auto& w : work_items(numel, averaging)) {
    chunks.push_back({static_cast<int32_t>(w.tensor), w.begin, w.end});
  }
  if (chunks.empty()) return;
  const Table<Runtime, Meta> table(metas, chunks, device);
  launch(table);
}

// The frame of every op: one device (checked, then guarded), tensors in place where
// in_place_order allows, else as contiguous views written back at the end, and per dtype one call of
// per_dtype(dtype, indices of that dtype's tensors, views, device), which launches.
template <typename Runtime, typename PerDtype>
void for_each_dtype(at::TensorList tensors, const char* what, const PerDtype& per_dtype) {
  if (tensors.empty()) return;
  const at::Device device = tensors[0].device();
  check_device<Runtime>(tensors[0], device, what);  // before the guard, which needs such a device
  const typename Runtime::Guard guard(device);
  ContiguousViews views;
  for (const auto dtype : dtypes_of(tensors)) {
    std::vector<size_t> indices;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].scalar_type() != dtype) continue;
      check_device<Runtime>(tensors[i], device, what);
      indices.push_back(i);
    }
    per_dtype(dtype, indices, views, device);
  }
  views.finish();
}

// ------------------------------------------------------------------------ rademacher_

template <typename scalar_t>
struct FillMeta {
  scalar_t* out;
  uint32_t key;
  MemoryOrder order;
};

// z of the element at this logical index.
template <typename T>
__device__ inline T rademacher_of(uint32_t key, int64_t index) {
  return rademacher_sign<T>(rademacher_base(key, index), index);
}

// z of the element at memory offset i of a tensor stored in `order`.
template <typename T>
__device__ inline T rademacher_at(uint32_t key, const MemoryOrder& order, int64_t i) {
  return rademacher_of<T>(key, order.logical(i));
}

template <typename scalar_t>
__global__ void rademacher_kernel(const FillMeta<scalar_t>* metas, const Chunk* chunks) {
  const Chunk ch = chunks[blockIdx.x];
  const FillMeta<scalar_t> t = metas[ch.tensor];
  each_thread([&](int64_t thread) {
    for (int64_t i = ch.begin + thread; i < ch.end; i += blockDim.x) {
      t.out[i] = rademacher_at<scalar_t>(t.key, t.order, i);
    }
  });
}

template <typename Runtime>
void rademacher(at::TensorList out, at::IntArrayRef keys) {
  check_one_per_key("rademacher_", keys, {out});
  for_each_dtype<Runtime>(out, "out", [&](at::ScalarType dtype, const std::vector<size_t>& indices,
                                           ContiguousViews& views, const at::Device& device) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "rademacher_", [&] {
      std::vector<FillMeta<scalar_t>> metas;
      std::vector<int64_t> numel;
      for (const size_t i : indices) {
        const auto order = in_place_order({out[i]});
        metas.push_back({views.write(out[i], order).data_ptr<scalar_t>(), checked_key(keys[i]),
                         order.value_or(MemoryOrder{})});
        numel.push_back(out[i].numel());
      }
      launch_over_chunks<Runtime>(metas, numel, device, [](const auto& table) {
        Runtime::launch(rademacher_kernel<scalar_t>, table.num_chunks, table.metas, table.chunks);
      });
    });
  });
}

// -------------------------------------------------------------- accumulate_hessian_

template <typename scalar_t>
struct AccumulateMeta {
  at::opmath_type<scalar_t>* partial_sum;
  const scalar_t* hz;
  const scalar_t* base;  // null: hz is Hz, else Hz = difference_quotient(hz, base, inv_step)
  uint32_t key;
  MemoryOrder order;
};

template <typename scalar_t>
__global__ void accumulate_kernel(const AccumulateMeta<scalar_t>* metas, const Chunk* chunks,
                                  at::opmath_type<scalar_t> inv_step) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Chunk ch = chunks[blockIdx.x];
  const AccumulateMeta<scalar_t> t = metas[ch.tensor];
  each_thread([&](int64_t thread) {
    for (int64_t i = ch.begin + thread; i < ch.end; i += blockDim.x) {
      const opmath_t z = rademacher_at<opmath_t>(t.key, t.order, i);
      const opmath_t hz = t.base ? difference_quotient<opmath_t>(t.hz[i], t.base[i], inv_step)
                                 : static_cast<opmath_t>(t.hz[i]);
      t.partial_sum[i] = hessian_estimate<opmath_t>(z, hz, t.partial_sum[i], 1);
    }
  });
}

template <typename Runtime>
void accumulate_hessian(at::TensorList partial_sums, at::TensorList hzs, at::TensorList bases, at::IntArrayRef keys,
                        double inv_step) {
  check_one_per_key("accumulate_hessian_", keys, {partial_sums, hzs});
  check_bases(bases, hzs);
  for_each_dtype<Runtime>(hzs, "hzs", [&](at::ScalarType dtype, const std::vector<size_t>& indices,
                                           ContiguousViews& views, const at::Device& device) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "accumulate_hessian_", [&] {
      std::vector<AccumulateMeta<scalar_t>> metas;
      std::vector<int64_t> numel;
      for (const size_t i : indices) {
        const StagedAccumulate s = stage_accumulate(i, partial_sums, hzs, bases, keys, views);
        metas.push_back({s.partial_sum.data_ptr<at::opmath_type<scalar_t>>(), s.hz.const_data_ptr<scalar_t>(),
                         data_or_null<scalar_t>(s.base), s.key, s.order});
        numel.push_back(hzs[i].numel());
      }
      const auto inv = static_cast<at::opmath_type<scalar_t>>(inv_step);
      launch_over_chunks<Runtime>(metas, numel, device, [&](const auto& table) {
        Runtime::launch(accumulate_kernel<scalar_t>, table.num_chunks, table.metas, table.chunks, inv);
      });
    });
  });
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
  const scalar_t* base;         // null: hz is Hz, else Hz = difference_quotient(hz, base, inv_step)
  const opmath_t* partial_sum;  // null when n_samples == 1
  uint32_t key;
  MemoryOrder order;            // the tensors' common order: element offsets are memory offsets
  Averaging averaging;
  bool vectorised;              // every pointer aligned for packs
  StepCoefficients<opmath_t> coefficients;
};

// Everything a lane needs, read once per launch.
template <typename opmath_t>
struct StepScalars {
  opmath_t n_samples;
  opmath_t inv_step;  // of a finite difference (1 without bases)
};

// Hz from the operands read at one element.
template <typename scalar_t, typename opmath_t>
__device__ inline opmath_t hz_of(const StepMeta<scalar_t>& t, scalar_t hz, scalar_t base,
                                 const StepScalars<opmath_t>& s) {
  return t.base ? difference_quotient<opmath_t>(hz, base, s.inv_step) : static_cast<opmath_t>(hz);
}

// D at memory offset i, logical index `index`: this step's estimate, or the kept one.
template <typename scalar_t, typename opmath_t>
__device__ inline opmath_t estimate_at(const StepMeta<scalar_t>& t, int64_t i, int64_t index,
                                       const StepScalars<opmath_t>& s) {
  if (t.hz == nullptr) return t.hessian[i];
  const opmath_t z = rademacher_of<opmath_t>(t.key, index);
  const opmath_t sum = t.partial_sum ? t.partial_sum[i] : opmath_t(0);
  return hessian_estimate<opmath_t>(z, hz_of(t, t.hz[i], t.base ? t.base[i] : scalar_t(0), s), sum, s.n_samples);
}

template <typename scalar_t, typename opmath_t>
__device__ inline opmath_t estimate_at(const StepMeta<scalar_t>& t, int64_t i, const StepScalars<opmath_t>& s) {
  return estimate_at(t, i, t.hz == nullptr ? 0 : t.order.logical(i), s);
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

// |D| when averaging over 1x1 kernels (a group of one: group_mean_abs, exactly).
template <typename scalar_t, typename opmath_t>
__device__ inline opmath_t averaged_alone(const StepMeta<scalar_t>& t, opmath_t d) {
  return t.averaging.average ? group_mean_abs<opmath_t>(1, [&](int64_t) { return d; }) : d;
}

// kPack consecutive elements with packed (16-byte for float32) loads and stores.
template <Power power, typename scalar_t, typename opmath_t>
__device__ inline void update_pack(const StepMeta<scalar_t>& t, int64_t i, const StepScalars<opmath_t>& scalars,
                                   const StepCoefficients<opmath_t>& c) {
  scalar_t p[kPack], g[kPack];
  opmath_t m[kPack], v[kPack], d[kPack];
  load(p, t.param + i);
  load(g, t.grad + i);
  load(m, t.exp_avg + i);
  load(v, t.exp_hessian_diag_sq + i);
  if (t.hz != nullptr) {
    scalar_t h[kPack], b[kPack] = {};
    opmath_t s[kPack] = {};
    load(h, t.hz + i);
    if (t.base) load(b, t.base + i);
    if (t.partial_sum) load(s, t.partial_sum + i);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const opmath_t z = rademacher_at<opmath_t>(t.key, t.order, i + k);
      d[k] = averaged_alone(t, hessian_estimate<opmath_t>(z, hz_of(t, h[k], b[k], scalars), s[k], scalars.n_samples));
    }
    if (t.hessian) store(t.hessian + i, d);
  } else {
    load(d, t.hessian + i);
#pragma unroll
    for (int k = 0; k < kPack; ++k) d[k] = averaged_alone(t, d[k]);
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

// Conv-kernel averaging over groups of more than one element, a block at a time and
// coalesced: the threads compute |D| of consecutive elements into shared memory, sum
// segments of kSegment elements side by side, combine each group's segment sums in
// order (math.h fixes that order for every backend), and update consecutive elements
// with their group's mean. Groups up to kGroupTile elements are handled whole groups
// per tile; a larger group is swept twice, first for its mean (tile by tile, the running
// sum of its segments kept in shared memory), then for its updates.
constexpr int64_t kGroupTile = 2048;  // a multiple of kSegment

template <Power power, typename scalar_t, typename opmath_t>
__device__ inline void averaged_chunk(const StepMeta<scalar_t>& t, const Chunk& ch,
                                      const StepScalars<opmath_t>& scalars, const StepCoefficients<opmath_t>& c) {
  __shared__ opmath_t abs_d[kGroupTile];
  __shared__ opmath_t sums[kGroupTile / 2];  // segment sums; then each group's mean at its first
  const int64_t group = t.averaging.group;
  const int64_t segments = segments_of(group);
  // |D| of the n elements from `first` into abs_d, then the sums of their segments
  // (segments restart at every group start, so `per_group` elements per group).
  const auto segment_sums = [&](int64_t first, int64_t n, int64_t per_group) {
    each_thread([&](int64_t thread) {
      for (int64_t j = thread; j < n; j += blockDim.x) abs_d[j] = std::abs(estimate_at(t, first + j, scalars));
    });
    block_barrier();
    const int64_t per_group_segments = segments_of(per_group);
    const int64_t count = n / per_group * per_group_segments;
    each_thread([&](int64_t thread) {
      for (int64_t q = thread; q < count; q += blockDim.x) {
        const auto q32 = static_cast<int32_t>(q), segments32 = static_cast<int32_t>(per_group_segments);  // < kGroupTile
        const int64_t group_end = (q32 / segments32 + 1) * per_group;
        const int64_t begin = group_end - per_group + q32 % segments32 * kSegment;
        const int64_t end = begin + kSegment < group_end ? begin + kSegment : group_end;
        sums[q] = segment_sum_abs<opmath_t>(begin, end, [&](int64_t k) { return abs_d[k]; });
      }
    });
    block_barrier();
  };

  if (group <= kGroupTile) {
    const int64_t tile = kGroupTile / group * group;
    for (int64_t start = ch.begin; start < ch.end; start += tile) {
      const int64_t n = ch.end - start < tile ? ch.end - start : tile;
      segment_sums(start, n, group);
      each_thread([&](int64_t thread) {
        for (int64_t g = thread; g < n / group; g += blockDim.x) {
          sums[g * segments] = mean_of_segments<opmath_t>(group, [&](int64_t s) { return sums[g * segments + s]; });
        }
      });
      block_barrier();
      each_thread([&](int64_t thread) {
        for (int64_t j = thread; j < n; j += blockDim.x) {
          // j < kGroupTile: a 32-bit division (a 64-bit one costs dozens of instructions)
          update_at<power>(t, start + j, sums[static_cast<int32_t>(j) / static_cast<int32_t>(group) * segments], c);
        }
      });
      block_barrier();  // before the next tile overwrites the shared memory
    }
    return;
  }
  __shared__ opmath_t running_sum;
  for (int64_t g = ch.begin; g < ch.end; g += group) {
    each_thread([&](int64_t thread) {
      if (thread == 0) running_sum = 0;
    });
    for (int64_t start = g; start < g + group; start += kGroupTile) {
      const int64_t n = g + group - start < kGroupTile ? g + group - start : kGroupTile;
      segment_sums(start, n, n);  // tile starts are multiples of kSegment into the group
      each_thread([&](int64_t thread) {
        if (thread == 0) {  // this tile's segments, in order, onto the group's running sum
          for (int64_t s = 0; s < segments_of(n); ++s) running_sum += sums[s];
        }
      });
      block_barrier();
    }
    // The running sum is the group's segments summed in order: mean_of_segments's result.
    const opmath_t mean = running_sum / static_cast<opmath_t>(group);
    each_thread([&](int64_t thread) {
      for (int64_t i = g + thread; i < g + group; i += blockDim.x) update_at<power>(t, i, mean, c);
    });
    block_barrier();  // running_sum is reset for the next group
  }
}

// Averaging groups interleaved in memory (Averaging::stride > 1, a channels-last conv
// weight's): the chunk's bounds are group indices q = b * stride + j, whose k-th element
// lies at memory offset (b * group + k) * stride + j (host.h). A thread takes a whole
// group, summing |D| in math.h's order and then updating its elements with the mean; the
// threads of a warp take consecutive j, so at every k they read consecutive addresses.
template <Power power, typename scalar_t, typename opmath_t>
__device__ inline void interleaved_chunk(const StepMeta<scalar_t>& t, const Chunk& ch,
                                         const StepScalars<opmath_t>& scalars, const StepCoefficients<opmath_t>& c) {
  const int64_t group = t.averaging.group, stride = t.averaging.stride;
  each_thread([&](int64_t thread) {
    for (int64_t q = ch.begin + thread; q < ch.end; q += blockDim.x) {
      const int64_t b = q / stride;
      const int64_t first = b * group * stride + (q - b * stride);
      // A group's elements are consecutive in logical order: element k's index is index + k.
      const int64_t index = t.hz == nullptr ? 0 : t.order.logical(first);
      const opmath_t mean = group_mean_abs<opmath_t>(
          group, [&](int64_t k) { return estimate_at(t, first + k * stride, index + k, scalars); });
      for (int64_t k = 0; k < group; ++k) update_at<power>(t, first + k * stride, mean, c);
    }
  });
}

template <Power power, typename scalar_t>
__global__ void fused_step_kernel(const StepMeta<scalar_t>* metas, const Chunk* chunks,
                                  StepScalars<at::opmath_type<scalar_t>> scalars) {
  using opmath_t = at::opmath_type<scalar_t>;
  const Chunk ch = chunks[blockIdx.x];
  const StepMeta<scalar_t> t = metas[ch.tensor];
  const StepCoefficients<opmath_t> c = t.coefficients;

  if (t.averaging.stride > 1) {
    interleaved_chunk<power>(t, ch, scalars, c);
    return;
  }
  if (t.averaging.average && t.averaging.group > 1) {
    averaged_chunk<power>(t, ch, scalars, c);
    return;
  }
  each_thread([&](int64_t thread) {
    int64_t i = ch.begin;
    if (t.vectorised) {  // chunk starts are multiples of kPack: every pack is aligned
      for (i = ch.begin + thread * kPack; i + kPack <= ch.end; i += int64_t(blockDim.x) * kPack) {
        update_pack<power>(t, i, scalars, c);
      }
      i = ch.begin + (ch.end - ch.begin) / kPack * kPack;  // the tail of the tensor's last chunk
    }
    for (i += thread; i < ch.end; i += blockDim.x) {
      update_at<power>(t, i, averaged_alone(t, estimate_at(t, i, scalars)), c);
    }
  });
}

template <typename Runtime>
void fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_hessian_diag_sqs, at::TensorList hessians, at::TensorList hzs,
                at::TensorList bases, at::TensorList partial_sums, at::IntArrayRef keys, at::IntArrayRef steps,
                double lr, double beta1, double beta2, double eps, double weight_decay, double hessian_power,
                int64_t n_samples, double inv_step, at::IntArrayRef groups) {
  const StepArguments a{params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, bases, partial_sums, keys, steps,
                        lr, beta1, beta2, eps, weight_decay, hessian_power, n_samples, groups};
  check_step_arguments(a);
  if (params.empty()) return;
  const Power power = power_of(hessian_power);
  for_each_dtype<Runtime>(params, "params", [&](at::ScalarType dtype, const std::vector<size_t>& indices,
                                                ContiguousViews& views, const at::Device& device) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_step_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      std::vector<StepMeta<scalar_t>> metas;
      std::vector<int64_t> numel;
      std::vector<Averaging> averaging;
      for (const size_t i : indices) {
        const StagedStep s = stage_step(i, a, views);
        StepMeta<scalar_t> t{};
        t.param = s.param.data_ptr<scalar_t>();
        t.grad = s.grad.const_data_ptr<scalar_t>();
        t.exp_avg = s.exp_avg.data_ptr<opmath_t>();
        t.exp_hessian_diag_sq = s.exp_hessian_diag_sq.data_ptr<opmath_t>();
        if (s.hessian.defined()) {  // only read on steps that reuse it
          t.hessian = a.hessian_step() ? s.hessian.data_ptr<opmath_t>()
                                       : const_cast<opmath_t*>(s.hessian.const_data_ptr<opmath_t>());
        }
        t.hz = data_or_null<scalar_t>(s.hz);
        t.base = data_or_null<scalar_t>(s.base);
        t.partial_sum = data_or_null<opmath_t>(s.partial_sum);
        t.key = s.key;
        t.order = s.order;
        t.averaging = s.averaging;
        t.vectorised = pack_aligned(t.param) && pack_aligned(t.grad) && pack_aligned(t.exp_avg) &&
                       pack_aligned(t.exp_hessian_diag_sq) && (!t.hessian || pack_aligned(t.hessian)) &&
                       (!t.hz || pack_aligned(t.hz)) && (!t.base || pack_aligned(t.base)) &&
                       (!t.partial_sum || pack_aligned(t.partial_sum));
        t.coefficients = rounded<opmath_t>(s.coefficients);
        metas.push_back(t);
        numel.push_back(params[i].numel());
        averaging.push_back(t.averaging);
      }
      const StepScalars<opmath_t> scalars{static_cast<opmath_t>(n_samples), static_cast<opmath_t>(inv_step)};
      launch_over_chunks<Runtime>(metas, numel, device, [&](const auto& table) {
        dispatch_power(power, [&](auto p) {
          Runtime::launch(fused_step_kernel<decltype(p)::value, scalar_t>, table.num_chunks, table.metas,
                          table.chunks, scalars);
        });
      }, averaging);
    });
  });
}

}  // namespace cuda
}  // namespace adahessian
