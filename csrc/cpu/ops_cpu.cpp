// CPU kernels of the adahessian ops (schemas in csrc/ops.cpp). Every op takes lists of
// tensors and runs one at::parallel_for over (tensor, chunk) work items, so a model of
// many small tensors costs per element what one big tensor does. Within a work item,
// tiles small enough for L1 go through at::vec::Vectorized loops that call the shared
// per-element math (adahessian/math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <adahessian/host.h>
#include <adahessian/math.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace adahessian {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// Elements per tile: the scratch buffers of a tile stay in L1.
constexpr int64_t kTile = 512;
// Fewest elements worth a thread (at::internal::GRAIN_SIZE, as torch's elementwise ops).
constexpr int64_t kGrain = 32768;

// sqrt and pow of at::vec lanes, for adahessian_update.
struct VecMath {
  template <typename V>
  static V sqrt(const V& x) { return x.sqrt(); }
  template <typename V>
  static V pow(const V& x, const V& y) { return x.pow(y); }
};

// Calls f(offset, count) over [0, n) in steps of one vector, the last one partial
// (Vectorized::loadu/store with a count), so tails run the same math as the rest.
template <typename Vec, typename F>
inline void for_each_vector(int64_t n, const F& f) {
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) f(k, Vec::size());
  if (k < n) f(k, n - k);
}

// z at logical indices start + j * step (j < n), for the vector with this key. In a
// tensor of fewer than 2^32 elements (narrow) the indices' high half, hence the hash
// base, is 0: one base and 32-bit arithmetic, which the compiler vectorises; otherwise
// the base is recomputed where the high half changes.
template <typename T>
void rademacher_strided(T* out, uint32_t key, bool narrow, uint64_t start, uint64_t step, int64_t n) {
  if (narrow) {
    const uint32_t base = rademacher_base(key, 0), low = static_cast<uint32_t>(start);
    const auto step32 = static_cast<uint32_t>(step);
    for (int64_t j = 0; j < n; ++j) out[j] = rademacher_sign<T>(base, low + static_cast<uint32_t>(j) * step32);
    return;
  }
  uint64_t high = ~uint64_t{0};
  uint32_t base = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t index = start + j * step;
    if ((index >> 32) != high) {
      high = index >> 32;
      base = rademacher_base(key, index);
    }
    out[j] = rademacher_sign<T>(base, index);
  }
}

// Calls f(k, run, start, step) over the memory offsets first .. first + count - 1 of a
// tensor stored in `order` (dims != 0), split into runs along its innermost memory
// dimension: at offset first + k + j (j < run) the logical index is start + j * step.
// One logical() per run.
template <typename F>
void for_each_run(const MemoryOrder& order, int64_t first, int64_t count, const F& f) {
  const int64_t run_length = order.sizes[order.dims - 1], step = order.logical_strides[order.dims - 1];
  for (int64_t k = 0; k < count;) {
    const int64_t run = std::min(count - k, run_length - (first + k) % run_length);
    f(k, run, static_cast<uint64_t>(order.logical(first + k)), static_cast<uint64_t>(step));
    k += run;
  }
}

// z of the elements at memory offsets first .. first + count - 1 of a tensor stored in
// `order`, for the vector with this key.
template <typename T>
void rademacher_fill(T* out, uint32_t key, int64_t first, int64_t count, const MemoryOrder& order) {
  if (order.dims != 0) {
    for_each_run(order, first, count, [&](int64_t k, int64_t run, uint64_t start, uint64_t step) {
      rademacher_strided(out + k, key, order.narrow, start, step, run);
    });
    return;
  }
  for (int64_t k = 0; k < count;) {
    const uint64_t index = first + k;
    // Up to the next multiple of 2^32 the high half of the index, hence base, is fixed.
    const int64_t run = std::min<int64_t>(count - k, (uint64_t{1} << 32) - (index & 0xFFFFFFFFu));
    const uint32_t base = rademacher_base(key, index);
    const uint32_t low = static_cast<uint32_t>(index);
    for (int64_t j = 0; j < run; ++j) out[k + j] = rademacher_sign<T>(base, low + static_cast<uint32_t>(j));
    k += run;
  }
}

template <typename F>
void parallel_over(const std::vector<WorkItem>& items, const F& f) {
  const auto count = static_cast<int64_t>(items.size());
  int64_t elements = 0;
  for (const auto& w : items) elements += w.elements;
  // Items per thread at least, so that each thread gets about kGrain elements or more.
  const int64_t grain = std::max<int64_t>(1, count * kGrain / std::max<int64_t>(1, elements));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(items[k]);
  });
}

// A tile of a tensor as opmath_t: the memory itself, or a converted copy in `scratch`
// for bfloat16/float16.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
const opmath_t* as_opmath(const scalar_t* src, opmath_t* scratch, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    return src;
  } else {
    at::vec::convert(src, scratch, n);
    return scratch;
  }
}

// The Hz operands of one tile: Hz itself, or with a base the finite difference
// difference_quotient(hz, base, inv_step).
template <typename scalar_t>
struct HzTile {
  const scalar_t* hz;
  const scalar_t* base;  // null: hz is Hz
  at::opmath_type<scalar_t> inv_step;
};

// out = hessian_estimate(z, Hz, partial_sum or 0, n_samples) over n elements, given z
// (which may be out); hz_scratch and base_scratch hold converted low-precision operands.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void estimate_from_z(int64_t n, const opmath_t* z_scratch, const HzTile<scalar_t>& hz, const opmath_t* partial_sum,
                     opmath_t n_samples, opmath_t* hz_scratch, opmath_t* base_scratch, opmath_t* out) {
  using Vec = Vectorized<opmath_t>;
  const opmath_t* h = as_opmath(hz.hz, hz_scratch, n);
  const opmath_t* b = hz.base ? as_opmath(hz.base, base_scratch, n) : nullptr;
  const Vec samples(n_samples), zero(0), inv_step(hz.inv_step);
  for_each_vector<Vec>(n, [&](int64_t k, int64_t m) {
    const Vec sum = partial_sum ? Vec::loadu(partial_sum + k, m) : zero;
    Vec hzv = Vec::loadu(h + k, m);
    if (b) hzv = difference_quotient(hzv, Vec::loadu(b + k, m), inv_step);
    hessian_estimate(Vec::loadu(z_scratch + k, m), hzv, sum, samples).store(out + k, m);
  });
}

// estimate_from_z over the tile of n elements at memory offset `start`, its z generated
// into z_scratch.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void estimate_tile(uint32_t key, const MemoryOrder& order, int64_t start, int64_t n, const HzTile<scalar_t>& hz,
                   const opmath_t* partial_sum, opmath_t n_samples, opmath_t* z_scratch, opmath_t* hz_scratch,
                   opmath_t* base_scratch, opmath_t* out) {
  rademacher_fill(z_scratch, key, start, n, order);
  estimate_from_z(n, z_scratch, hz, partial_sum, n_samples, hz_scratch, base_scratch, out);
}

// ------------------------------------------------------------------------ rademacher_

void rademacher_cpu(at::TensorList out, at::IntArrayRef keys) {
  check_one_per_key("rademacher_", keys, {out});
  ContiguousViews views;
  std::vector<Tensor> dst;
  std::vector<MemoryOrder> orders;
  std::vector<uint32_t> key;
  std::vector<int64_t> numel;
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i].device().is_cpu(), "adahessian::rademacher_: out must be CPU tensors");
    const auto order = in_place_order({out[i]});
    dst.push_back(views.write(out[i], order));
    orders.push_back(order.value_or(MemoryOrder{}));
    key.push_back(checked_key(keys[i]));
    numel.push_back(out[i].numel());
  }
  const auto items = work_items(numel);
  parallel_over(items, [&](const WorkItem& w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst[w.tensor].scalar_type(), "rademacher_", [&] {
      rademacher_fill(dst[w.tensor].data_ptr<scalar_t>() + w.begin, key[w.tensor], w.begin, w.end - w.begin,
                      orders[w.tensor]);
    });
  });
  views.finish();
}

// -------------------------------------------------------------- accumulate_hessian_

template <typename scalar_t>
void accumulate_chunk(const StagedAccumulate& t, double inv_step, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t z[kTile], hz_scratch[kTile], base_scratch[kTile];
  const scalar_t* base = data_or_null<scalar_t>(t.base);
  for (int64_t start = begin; start < end; start += kTile) {
    opmath_t* a = t.partial_sum.data_ptr<opmath_t>() + start;
    const HzTile<scalar_t> tile{t.hz.const_data_ptr<scalar_t>() + start, base ? base + start : nullptr,
                                static_cast<opmath_t>(inv_step)};
    // acc + z * Hz, in the reference's order: the estimate with n_samples = 1.
    estimate_tile(t.key, t.order, start, std::min(kTile, end - start), tile, a, opmath_t(1), z, hz_scratch,
                  base_scratch, a);
  }
}

void accumulate_hessian_cpu(at::TensorList partial_sums, at::TensorList hzs, at::TensorList bases,
                            at::IntArrayRef keys, double inv_step) {
  check_one_per_key("accumulate_hessian_", keys, {partial_sums, hzs});
  check_bases(bases, hzs);
  ContiguousViews views;
  std::vector<StagedAccumulate> staged;
  std::vector<int64_t> numel;
  for (size_t i = 0; i < hzs.size(); ++i) {
    TORCH_CHECK(hzs[i].device().is_cpu(), "adahessian::accumulate_hessian_: hzs must be CPU tensors");
    staged.push_back(stage_accumulate(i, partial_sums, hzs, bases, keys, views));
    numel.push_back(hzs[i].numel());
  }
  const auto items = work_items(numel);
  parallel_over(items, [&](const WorkItem& w) {
    const StagedAccumulate& t = staged[w.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.hz.scalar_type(), "accumulate_hessian_", [&] {
      accumulate_chunk<scalar_t>(t, inv_step, w.begin, w.end);
    });
  });
  views.finish();
}

// ---------------------------------------------------------------------- fused_step_

// A step's view of one tensor: raw pointers and the vector-typed coefficients.
template <typename scalar_t>
struct StepPointers {
  using opmath_t = at::opmath_type<scalar_t>;
  explicit StepPointers(const StagedStep& t)
      : c(rounded<opmath_t, Vectorized<opmath_t>>(t.coefficients)),
        param(t.param.data_ptr<scalar_t>()),
        grad(t.grad.const_data_ptr<scalar_t>()),
        exp_avg(t.exp_avg.data_ptr<opmath_t>()),
        exp_hessian_diag_sq(t.exp_hessian_diag_sq.data_ptr<opmath_t>()),
        hessian(t.hessian.defined() ? t.hessian.data_ptr<opmath_t>() : nullptr),
        hz(data_or_null<scalar_t>(t.hz)),
        base(data_or_null<scalar_t>(t.base)),
        partial_sum(data_or_null<opmath_t>(t.partial_sum)) {}
  StepCoefficients<Vectorized<opmath_t>> c;
  scalar_t* param;
  const scalar_t* grad;
  opmath_t* exp_avg;
  opmath_t* exp_hessian_diag_sq;
  opmath_t* hessian;
  const scalar_t* hz;
  const scalar_t* base;
  const opmath_t* partial_sum;

  // The operands of Hz at memory offset `start`.
  HzTile<scalar_t> hz_at(int64_t start, double inv_step) const {
    return {hz + start, base ? base + start : nullptr, static_cast<opmath_t>(inv_step)};
  }
};

// The rows of a Scratch.
enum class Row { d, hz, base, param, grad, segment, sum };

// Scratch for one tile of n elements, uninitialised (written before read).
template <typename opmath_t>
struct Scratch {
  explicit Scratch(int64_t n) : memory(new opmath_t[7 * n]), tile(n) {}
  opmath_t* at(Row row) const { return memory.get() + static_cast<int>(row) * tile; }
  std::unique_ptr<opmath_t[]> memory;
  int64_t tile;
};

// Steps 3-5 (weight decay, moments, bias correction, the update) of the n elements at
// memory offset start, given their D, in one sweep.
template <typename scalar_t, Power power, typename opmath_t = at::opmath_type<scalar_t>>
void update_run(const StepPointers<scalar_t>& s, int64_t start, int64_t n, const opmath_t* d,
                const Scratch<opmath_t>& scratch) {
  using Vec = Vectorized<opmath_t>;
  opmath_t* p = scratch.at(Row::param);
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    p = s.param + start;
  } else {
    at::vec::convert(s.param + start, p, n);
  }
  const opmath_t* g = as_opmath(s.grad + start, scratch.at(Row::grad), n);
  opmath_t* m1 = s.exp_avg + start;
  opmath_t* m2 = s.exp_hessian_diag_sq + start;
  for_each_vector<Vec>(n, [&](int64_t k, int64_t m) {
    Vec pv = Vec::loadu(p + k, m), m1v = Vec::loadu(m1 + k, m), m2v = Vec::loadu(m2 + k, m);
    adahessian_update<power, VecMath>(pv, m1v, m2v, Vec::loadu(g + k, m), Vec::loadu(d + k, m), s.c);
    pv.store(p + k, m);
    m1v.store(m1 + k, m);
    m2v.store(m2 + k, m);
  });
  if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
    at::vec::convert(p, s.param + start, n);  // the one rounding of a low-precision parameter
  }
}

// The elements [begin, end) of a tensor whose averaging groups are runs of memory, tile
// by tile.
template <typename scalar_t, Power power>
void step_chunk(const StagedStep& t, double n_samples, double inv_step, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  const StepPointers<scalar_t> s(t);
  const bool average = t.averaging.average;
  const int64_t group = t.averaging.group;
  // Tiles hold whole averaging groups; a group larger than kTile makes the tile larger.
  const int64_t tile = std::max<int64_t>(1, kTile / group) * group;
  const Scratch<opmath_t> scratch(tile);
  opmath_t* d_tile = scratch.at(Row::d);  // z, then D

  for (int64_t start = begin; start < end; start += tile) {
    const int64_t n = std::min(tile, end - start);
    // 1. D: this step's estimate, or the kept one.
    const opmath_t* d = s.hessian ? s.hessian + start : nullptr;
    if (s.hz) {
      estimate_tile(t.key, t.order, start, n, s.hz_at(start, inv_step), s.partial_sum ? s.partial_sum + start : nullptr,
                    opmath_t(n_samples), d_tile, scratch.at(Row::hz), scratch.at(Row::base), d_tile);
      d = d_tile;
    }
    // 2. Spatial averaging: each group's mean of |D|.
    if (average) {
      for (int64_t g = 0; g < n; g += group) {
        const opmath_t mean = group_mean_abs<opmath_t>(group, [&](int64_t k) { return d[g + k]; });
        std::fill(d_tile + g, d_tile + g + group, mean);
      }
      d = d_tile;
    }
    if (s.hz && s.hessian) std::memcpy(s.hessian + start, d, n * sizeof(opmath_t));
    update_run<scalar_t, power>(s, start, n, d, scratch);
  }
}

// Groups interleaved in memory, as whole blocks: block b (its stride groups, b * group *
// stride .. + group * stride) is one run of memory, in place of a tile. Larger blocks go
// column by column (kTile groups at a time), which needs less scratch.
constexpr int64_t kBlock = 1 << 14;

// The groups [begin, end) of a tensor whose averaging groups interleave in memory
// (Averaging::stride > 1; group q = b * stride + j has its k-th element at memory offset
// (b * group + k) * stride + j, host.h): n groups of one b side by side, one vector lane
// each, row k (their k-th elements, a run of memory) by row k. D of the rows, each
// row's |D| added to the groups' sums in math.h's order, then the update of each row
// with the groups' means.
template <typename scalar_t, Power power>
void step_interleaved_chunk(const StagedStep& t, double n_samples, double inv_step, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const StepPointers<scalar_t> s(t);
  const int64_t group = t.averaging.group, stride = t.averaging.stride;
  const int64_t block = group * stride;
  const bool whole_blocks = block <= kBlock;
  TORCH_INTERNAL_ASSERT(!whole_blocks || (begin % stride == 0 && end % stride == 0),
                        "adahessian: a work item splits a block of interleaved groups");
  const Scratch<opmath_t> scratch(std::max(kTile, whole_blocks ? block : kTile));
  opmath_t* d_tile = scratch.at(Row::d);  // D of the rows at d_tile + k * n, then the means
  opmath_t* segment = scratch.at(Row::segment);
  opmath_t* mean = scratch.at(Row::sum);  // the sums, then the means

  for (int64_t q = begin; q < end;) {
    const int64_t b = q / stride, j = q - b * stride;
    const int64_t n = whole_blocks ? stride : std::min({end - q, stride - j, kTile});
    const int64_t first = b * block + j;  // of row 0
    // This step's D: of a whole block in one call (row k at d_tile + k * n), of a column
    // tile row by row below.
    if (s.hz && whole_blocks) {
      estimate_tile(t.key, t.order, first, block, s.hz_at(first, inv_step),
                    s.partial_sum ? s.partial_sum + first : nullptr, opmath_t(n_samples), d_tile, scratch.at(Row::hz),
                    scratch.at(Row::base), d_tile);
    }
    std::fill(segment, segment + n, opmath_t(0));
    std::fill(mean, mean + n, opmath_t(0));
    for (int64_t k = 0; k < group; ++k) {
      if (s.hz && !whole_blocks) {
        opmath_t* d_row = d_tile;  // one row at a time
        const int64_t row = first + k * stride;
        // A group's elements are consecutive in logical order: row k's indices are row 0's + k.
        for_each_run(t.order, first, n, [&](int64_t c, int64_t run, uint64_t start, uint64_t step) {
          rademacher_strided(d_row + c, t.key, t.order.narrow, start + k, step, run);
        });
        estimate_from_z(n, d_row, s.hz_at(row, inv_step), s.partial_sum ? s.partial_sum + row : nullptr,
                        opmath_t(n_samples), scratch.at(Row::hz), scratch.at(Row::base), d_row);
      }
      const opmath_t* d = !s.hz ? s.hessian + first + k * stride : whole_blocks ? d_tile + k * n : d_tile;
      for_each_vector<Vec>(n, [&](int64_t c, int64_t m) {
        Vec seg = Vec::loadu(segment + c, m), sum = Vec::loadu(mean + c, m);
        add_to_group_sum(k, group, Vec::loadu(d + c, m).abs(), seg, sum);
        seg.store(segment + c, m);
        sum.store(mean + c, m);
      });
    }
    const Vec size(static_cast<opmath_t>(group));
    for_each_vector<Vec>(n, [&](int64_t c, int64_t m) { (Vec::loadu(mean + c, m) / size).store(mean + c, m); });
    if (whole_blocks) {  // the means row by row: the block's averaged D, then one sweep
      for (int64_t k = 0; k < group; ++k) std::memcpy(d_tile + k * n, mean, n * sizeof(opmath_t));
      if (s.hz && s.hessian) std::memcpy(s.hessian + first, d_tile, block * sizeof(opmath_t));
      update_run<scalar_t, power>(s, first, block, d_tile, scratch);
    } else {
      for (int64_t k = 0; k < group; ++k) {
        const int64_t row = first + k * stride;
        if (s.hz && s.hessian) std::memcpy(s.hessian + row, mean, n * sizeof(opmath_t));
        update_run<scalar_t, power>(s, row, n, mean, scratch);
      }
    }
    q += n;
  }
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_hessian_diag_sqs, at::TensorList hessians, at::TensorList hzs,
                    at::TensorList bases, at::TensorList partial_sums, at::IntArrayRef keys, at::IntArrayRef steps,
                    double lr, double beta1, double beta2, double eps, double weight_decay, double hessian_power,
                    int64_t n_samples, double inv_step, at::IntArrayRef groups) {
  const StepArguments a{params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, bases, partial_sums, keys, steps,
                        lr, beta1, beta2, eps, weight_decay, hessian_power, n_samples, groups};
  check_step_arguments(a);
  const Power power = power_of(hessian_power);

  ContiguousViews views;
  std::vector<StagedStep> tensors;
  std::vector<int64_t> numel;
  std::vector<Averaging> averaging;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), "adahessian::fused_step_: params must be CPU tensors");
    tensors.push_back(stage_step(i, a, views));
    numel.push_back(params[i].numel());
    averaging.push_back(tensors.back().averaging);
  }

  const auto items = work_items(numel, averaging);
  parallel_over(items, [&](const WorkItem& w) {
    const StagedStep& t = tensors[w.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.param.scalar_type(), "fused_step_", [&] {
      dispatch_power(power, [&](auto p) {
        if (t.averaging.stride > 1) {
          step_interleaved_chunk<scalar_t, decltype(p)::value>(t, n_samples, inv_step, w.begin, w.end);
        } else {
          step_chunk<scalar_t, decltype(p)::value>(t, n_samples, inv_step, w.begin, w.end);
        }
      });
    });
  });
  views.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(adahessian, CPU, m) {
  m.impl("rademacher_", &rademacher_cpu);
  m.impl("accumulate_hessian_", &accumulate_hessian_cpu);
  m.impl("fused_step_", &fused_step_cpu);
}

}  // namespace adahessian
