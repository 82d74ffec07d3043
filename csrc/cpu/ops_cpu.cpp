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
#include <optional>
#include <utility>
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

// z of the elements at memory offsets first .. first + count - 1 of a tensor stored in
// `order`, for the vector with this key.
template <typename T>
void rademacher_fill(T* out, uint32_t key, int64_t first, int64_t count, const MemoryOrder& order) {
  if (order.dims != 0) {  // logical indices jump: one base per element
    for (int64_t k = 0; k < count; ++k) {
      const uint64_t index = order.logical(first + k);
      out[k] = rademacher_sign<T>(rademacher_base(key, index), index);
    }
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
  for (const auto& w : items) elements += w.end - w.begin;
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

// out = hessian_estimate(z, Hz, partial_sum or 0, n_samples) over the tile of
// n elements at memory offset `start`; z is generated into z_scratch, which may be out;
// hz_scratch and base_scratch hold converted low-precision operands.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void estimate_tile(uint32_t key, const MemoryOrder& order, int64_t start, int64_t n, const HzTile<scalar_t>& hz,
                   const opmath_t* partial_sum, opmath_t n_samples, opmath_t* z_scratch, opmath_t* hz_scratch,
                   opmath_t* base_scratch, opmath_t* out) {
  using Vec = Vectorized<opmath_t>;
  rademacher_fill(z_scratch, key, start, n, order);
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
  const auto items = work_items(numel, std::vector<int64_t>(out.size(), 1));
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
void accumulate_chunk(const Tensor& acc, const Tensor& hz, const Tensor& base, double inv_step, uint32_t key,
                      const MemoryOrder& order, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t z[kTile], hz_scratch[kTile], base_scratch[kTile];
  for (int64_t start = begin; start < end; start += kTile) {
    opmath_t* a = acc.data_ptr<opmath_t>() + start;
    const HzTile<scalar_t> tile{hz.const_data_ptr<scalar_t>() + start,
                                base.defined() ? base.const_data_ptr<scalar_t>() + start : nullptr,
                                static_cast<opmath_t>(inv_step)};
    // acc + z * Hz, in the reference's order: the estimate with n_samples = 1.
    estimate_tile(key, order, start, std::min(kTile, end - start), tile, a, opmath_t(1), z, hz_scratch, base_scratch,
                  a);
  }
}

void accumulate_hessian_cpu(at::TensorList partial_sums, at::TensorList hzs, at::TensorList bases,
                            at::IntArrayRef keys, double inv_step) {
  check_one_per_key("accumulate_hessian_", keys, {partial_sums, hzs});
  check_bases(bases, hzs);
  ContiguousViews views;
  std::vector<Tensor> acc, hz, base;
  std::vector<MemoryOrder> orders;
  std::vector<uint32_t> key;
  std::vector<int64_t> numel;
  for (size_t i = 0; i < hzs.size(); ++i) {
    TORCH_CHECK(hzs[i].device().is_cpu(), "adahessian::accumulate_hessian_: hzs must be CPU tensors");
    check_like(partial_sums[i], hzs[i], at::toOpMathType(hzs[i].scalar_type()), "partial_sums");
    if (!bases.empty()) check_like(bases[i], hzs[i], hzs[i].scalar_type(), "bases");
    const auto order = in_place_order({partial_sums[i], hzs[i], bases.empty() ? Tensor() : bases[i]});
    acc.push_back(views.write(partial_sums[i], order));
    hz.push_back(views.read(hzs[i], order));
    base.push_back(bases.empty() ? Tensor() : views.read(bases[i], order));
    orders.push_back(order.value_or(MemoryOrder{}));
    key.push_back(checked_key(keys[i]));
    numel.push_back(hzs[i].numel());
  }
  const auto items = work_items(numel, std::vector<int64_t>(hzs.size(), 1));
  parallel_over(items, [&](const WorkItem& w) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hz[w.tensor].scalar_type(), "accumulate_hessian_", [&] {
      accumulate_chunk<scalar_t>(acc[w.tensor], hz[w.tensor], base[w.tensor], inv_step, key[w.tensor],
                                 orders[w.tensor], w.begin, w.end);
    });
  });
  views.finish();
}

// ---------------------------------------------------------------------- fused_step_

// One parameter's tensors (in place, or contiguous copies) and scalars.
struct StepTensor {
  Tensor param, grad, exp_avg, exp_hessian_diag_sq;
  Tensor hessian;      // D kept for later steps; undefined when not kept
  Tensor hz;           // undefined on steps that reuse the kept D
  Tensor base;         // defined when Hz is the finite difference (hz - base) * inv_step
  Tensor partial_sum;  // undefined when n_samples == 1
  uint32_t key = 0;
  MemoryOrder order;  // the tensors' common order: element offsets are memory offsets
  Averaging averaging;
  StepCoefficients<double> coefficients;
};

template <typename scalar_t, Power power>
void step_chunk(const StepTensor& t, double n_samples, double inv_step, int64_t begin, int64_t end) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  const auto c = rounded<opmath_t, Vec>(t.coefficients);
  const auto [average, group] = t.averaging;

  // Tiles hold whole averaging groups; a group larger than kTile makes the tile larger.
  const int64_t tile = std::max<int64_t>(1, kTile / group) * group;
  std::unique_ptr<opmath_t[]> scratch(new opmath_t[5 * tile]);  // uninitialised: written before read
  opmath_t* d_tile = scratch.get();  // z, then D
  opmath_t* hz_scratch = d_tile + tile;
  opmath_t* base_scratch = hz_scratch + tile;
  opmath_t* param_scratch = base_scratch + tile;
  opmath_t* grad_scratch = param_scratch + tile;

  scalar_t* param = t.param.data_ptr<scalar_t>();
  const scalar_t* grad = t.grad.const_data_ptr<scalar_t>();
  opmath_t* exp_avg = t.exp_avg.data_ptr<opmath_t>();
  opmath_t* exp_hessian_diag_sq = t.exp_hessian_diag_sq.data_ptr<opmath_t>();
  opmath_t* hessian = t.hessian.defined() ? t.hessian.data_ptr<opmath_t>() : nullptr;
  const scalar_t* hz = t.hz.defined() ? t.hz.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* base = t.base.defined() ? t.base.const_data_ptr<scalar_t>() : nullptr;
  const opmath_t* partial_sum = t.partial_sum.defined() ? t.partial_sum.const_data_ptr<opmath_t>() : nullptr;

  for (int64_t start = begin; start < end; start += tile) {
    const int64_t n = std::min(tile, end - start);

    // 1. D: this step's estimate, or the kept one.
    const opmath_t* d = hessian ? hessian + start : nullptr;
    if (hz) {
      const HzTile<scalar_t> tile_hz{hz + start, base ? base + start : nullptr, static_cast<opmath_t>(inv_step)};
      estimate_tile(t.key, t.order, start, n, tile_hz, partial_sum ? partial_sum + start : nullptr,
                    opmath_t(n_samples), d_tile, hz_scratch, base_scratch, d_tile);
      d = d_tile;
    }
    // 2. Conv-kernel averaging: each group's mean of |D|.
    if (average) {
      for (int64_t g = 0; g < n; g += group) {
        const opmath_t mean = group_mean_abs<opmath_t>(group, [&](int64_t k) { return d[g + k]; });
        std::fill(d_tile + g, d_tile + g + group, mean);
      }
      d = d_tile;
    }
    if (hz && hessian) std::memcpy(hessian + start, d, n * sizeof(opmath_t));

    // 3-5. Weight decay, moments, bias correction and the update, in one sweep.
    opmath_t* p = param_scratch;
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      p = param + start;
    } else {
      at::vec::convert(param + start, p, n);
    }
    const opmath_t* g = as_opmath(grad + start, grad_scratch, n);
    opmath_t* m1 = exp_avg + start;
    opmath_t* m2 = exp_hessian_diag_sq + start;
    for_each_vector<Vec>(n, [&](int64_t k, int64_t m) {
      Vec pv = Vec::loadu(p + k, m), m1v = Vec::loadu(m1 + k, m), m2v = Vec::loadu(m2 + k, m);
      adahessian_update<power, VecMath>(pv, m1v, m2v, Vec::loadu(g + k, m), Vec::loadu(d + k, m), c);
      pv.store(p + k, m);
      m1v.store(m1 + k, m);
      m2v.store(m2 + k, m);
    });
    if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
      at::vec::convert(p, param + start, n);  // the one rounding of a low-precision parameter
    }
  }
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_hessian_diag_sqs, at::TensorList hessians, at::TensorList hzs,
                    at::TensorList bases, at::TensorList partial_sums, at::IntArrayRef keys, at::IntArrayRef steps,
                    double lr, double beta1, double beta2, double eps, double weight_decay, double hessian_power,
                    int64_t n_samples, double inv_step, bool average_conv_kernel, c10::string_view spatial_averaging,
                int64_t block_length) {
  check_step_arguments(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, bases, partial_sums, keys, steps,
                       n_samples);
  const size_t count = params.size();
  const bool hessian_step = !hzs.empty();
  const Power power = power_of(hessian_power);

  ContiguousViews views;
  std::vector<StepTensor> tensors;
  std::vector<int64_t> numel, group;
  for (size_t i = 0; i < count; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "adahessian::fused_step_: params must be CPU tensors");
    check_step_tensors(i, params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, bases, partial_sums);
    StepTensor t;
    t.averaging = averaging_of(p, average_conv_kernel, spatial_averaging, block_length);
    const auto order = in_place_order(step_tensors_of(i, params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs,
                                                      bases, partial_sums),
                                      t.averaging.group);
    t.order = order.value_or(MemoryOrder{});
    t.param = views.write(p, order);
    t.grad = views.read(grads[i], order);
    t.exp_avg = views.write(exp_avgs[i], order);
    t.exp_hessian_diag_sq = views.write(exp_hessian_diag_sqs[i], order);
    if (!hessians.empty()) {
      t.hessian = hessian_step ? views.write(hessians[i], order) : views.read(hessians[i], order);
    }
    if (hessian_step) {
      t.hz = views.read(hzs[i], order);
      if (!bases.empty()) t.base = views.read(bases[i], order);
      t.key = checked_key(keys[i]);
      if (!partial_sums.empty()) t.partial_sum = views.read(partial_sums[i], order);
    }
    t.coefficients = step_coefficients(steps[i], lr, beta1, beta2, eps, weight_decay, hessian_power);
    numel.push_back(p.numel());
    group.push_back(t.averaging.group);
    tensors.push_back(std::move(t));
  }

  const auto items = work_items(numel, group);
  parallel_over(items, [&](const WorkItem& w) {
    const StepTensor& t = tensors[w.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.param.scalar_type(), "fused_step_", [&] {
      dispatch_power(power, [&](auto p) {
        step_chunk<scalar_t, decltype(p)::value>(t, n_samples, inv_step, w.begin, w.end);
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
