// Host-side pieces shared by the CPU and CUDA kernels: argument checks, the split of
// tensors into work items, contiguous staging of strided tensors, the per-tensor scalars
// of a step, and each op's per-tensor staging (StagedStep, StagedAccumulate), written
// once for both. Everything per element (or per averaging group) lives in math.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <adahessian/layout.h>
#include <adahessian/math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <numeric>
#include <optional>
#include <set>
#include <type_traits>
#include <utility>
#include <vector>

namespace adahessian {

// Elements per work item (a CPU task, a CUDA block): large enough to amortise
// scheduling, small enough to balance a few big tensors over the workers. A multiple of
// every vector width, so vectorised code sees aligned work-item starts.
constexpr int64_t kChunk = 1 << 16;

// Spatial averaging of one parameter, as fused_step_'s `groups` states it (csrc/ops.cpp;
// adahessian/averaging.py decides the groups, the kernels only apply them): whether D
// becomes the group_mean_abs of each group of `group` consecutive elements in logical
// row-major order (a group of 1: D becomes |D|).
struct Averaging {
  bool average;
  int64_t group;       // 1 when not averaging
  int64_t stride = 1;  // group_stride_of in the memory processed (step_layout_of sets it)
};

// A work item's bounds are memory offsets, or for a tensor whose averaging groups
// interleave in memory (Averaging::stride > 1) group indices (see Averaging).
struct WorkItem {
  size_t tensor;
  int64_t begin, end;
  int64_t elements;
};

// Splits tensors of these sizes into work items of whole averaging groups (averaging
// reduces over a group, so a group never straddles two items); no averaging when
// `averaging` is empty. Interleaved groups come in blocks of stride groups, one run of
// memory (b * group * stride onwards): items hold whole blocks where a block fits in one.
inline std::vector<WorkItem> work_items(const std::vector<int64_t>& numel,
                                        const std::vector<Averaging>& averaging = {}) {
  std::vector<WorkItem> items;
  for (size_t i = 0; i < numel.size(); ++i) {
    const auto [average, group, stride] = averaging.empty() ? Averaging{false, 1} : averaging[i];
    const bool interleaved = stride > 1;
    const int64_t block = group * stride;
    const int64_t groups = interleaved && block <= kChunk ? kChunk / block * stride  // per item
                                                          : std::max<int64_t>(1, kChunk / group);
    const int64_t unit = interleaved ? 1 : group;  // elements or groups, as the bounds count
    const int64_t total = numel[i] / (interleaved ? group : 1);
    for (int64_t begin = 0; begin < total; begin += groups * unit) {
      const int64_t end = std::min(total, begin + groups * unit);
      items.push_back({i, begin, end, (end - begin) * (interleaved ? group : 1)});
    }
  }
  return items;
}

inline uint32_t checked_key(int64_t key) {
  TORCH_CHECK(key >= 0 && key <= 0xFFFFFFFFll, "adahessian: sampler keys are 32-bit unsigned, got ", key);
  return static_cast<uint32_t>(key);
}

// The memory order of a dense tensor (no gaps, no overlaps); nullopt otherwise or beyond
// kMaxDims dimensions.
inline std::optional<MemoryOrder> memory_order_of(const at::Tensor& t) {
  MemoryOrder order;
  order.narrow = t.numel() < (int64_t{1} << 32);
  if (t.is_contiguous()) return order;
  if (!t.is_non_overlapping_and_dense() || t.dim() > kMaxDims) return std::nullopt;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.push_back(d);
  }
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return t.stride(a) > t.stride(b); });
  for (const int64_t d : dims) {
    order.sizes[order.dims] = t.size(d);
    order.logical_strides[order.dims] =
        std::accumulate(t.sizes().begin() + d + 1, t.sizes().end(), int64_t{1}, std::multiplies<int64_t>());
    ++order.dims;
  }
  return order;
}

// Whether b is laid out as a (same shape; strides compared where a dimension has more
// than one element, the only ones that address memory).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Where the groups of `group` consecutive elements in logical order (a tensor's averaging
// groups) lie in the memory of the dense tensor t: the distance between a group's
// consecutive elements, 1 where each group is a run of memory in logical order.
// Otherwise groups interleave: in a channels-last conv weight (memory order O, kh, kw, I)
// a kh*kw group's elements are I apart, I groups side by side. The general form, which
// work items and kernels rely on: group q = b * stride + j (j < stride) has its k-th
// element at memory offset (b * group + k) * stride + j. That holds when the group
// spans the logical trailing dimensions (the first of them possibly in part) and these
// are adjacent in memory in logical order; nullopt otherwise (say, a transposed kh, kw).
inline std::optional<int64_t> group_stride_of(const at::Tensor& t, int64_t group) {
  if (group == 1 || t.is_contiguous()) return 1;
  int64_t covered = 1, stride = 0, next = 0;  // next: the stride the group's next dimension needs
  for (int64_t d = t.dim() - 1; d >= 0 && covered < group; --d) {
    const int64_t size = t.size(d), need = group / covered;
    if (size == 1) continue;
    if (size <= need ? need % size != 0 : size % need != 0) return std::nullopt;
    if (stride == 0) {
      stride = t.stride(d);
    } else if (t.stride(d) != next) {
      return std::nullopt;
    }
    next = t.stride(d) * size;
    covered *= std::min(size, need);
  }
  if (covered != group) return std::nullopt;
  return stride;
}

// The memory order in which one parameter's tensors are processed in place, decided by
// the tensors it writes (the undefined ones skipped): they are dense with one layout.
// The tensors it only reads follow them (ContiguousViews::read). Otherwise (nullopt)
// every tensor is staged as a contiguous copy.
inline std::optional<MemoryOrder> in_place_order(const std::vector<at::Tensor>& tensors) {
  const at::Tensor& first = tensors.front();
  std::optional<MemoryOrder> order = memory_order_of(first);
  if (!order) return std::nullopt;
  for (const auto& t : tensors) {
    if (t.defined() && !same_layout(first, t)) return std::nullopt;
  }
  return order;
}

// The kernels walk every tensor in one order per parameter: memory order where
// in_place_order accepts the tensors written, else logical row-major order over
// contiguous copies. A tensor only read that is laid out otherwise than those written
// (the double backward returns a channels-last weight's Hz in another order) is copied
// into their layout: one copy, not the whole parameter staged. Copies are kept alive
// until finish(), and mutated ones are written back there.
class ContiguousViews {
 public:
  const at::Tensor& read(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    keep_.push_back(t.contiguous());
    return keep_.back();
  }
  // A tensor only read: as it is, or copied, in the layout of `like` (a tensor written)
  // where in_place is set; else contiguous.
  const at::Tensor& read(const at::Tensor& t, const std::optional<MemoryOrder>& in_place, const at::Tensor& like) {
    if (!in_place) return read(t);
    if (same_layout(like, t)) return t;
    keep_.push_back(at::empty_like(like, t.options()).copy_(t));
    return keep_.back();
  }
  const at::Tensor& write(const at::Tensor& t, const std::optional<MemoryOrder>& in_place) {
    return in_place ? t : write(t);
  }
  const at::Tensor& write(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    write_back_.emplace_back(t, t.contiguous());
    return write_back_.back().second;
  }
  void finish() {
    for (auto& [dst, src] : write_back_) dst.copy_(src);
  }

 private:
  // std::vector would move its elements on growth and invalidate returned references.
  std::deque<at::Tensor> keep_;
  std::deque<std::pair<at::Tensor, at::Tensor>> write_back_;
};

inline void check_like(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device() == param.device(), "adahessian: ", what, " is on ", t.device(), ", its parameter on ",
              param.device());
  TORCH_CHECK(t.sizes() == param.sizes(), "adahessian: ", what, " has shape ", t.sizes(), ", its parameter ",
              param.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "adahessian: ", what, " must be ", dtype, ", got ", t.scalar_type());
}

// The distinct dtypes of a list, in a fixed order: kernels dispatch once per dtype.
inline std::vector<at::ScalarType> dtypes_of(at::TensorList tensors) {
  std::set<at::ScalarType> seen;
  for (const auto& t : tensors) seen.insert(t.scalar_type());
  return {seen.begin(), seen.end()};
}

inline Power power_of(double hessian_power) {
  return hessian_power == 1.0 ? Power::kOne : hessian_power == 0.5 ? Power::kHalf : Power::kGeneral;
}

// Calls f(std::integral_constant<Power, power>{}): the kernels take the power as a
// template argument, so each fast path compiles to its own loop.
template <typename F>
void dispatch_power(Power power, const F& f) {
  switch (power) {
    case Power::kOne: return f(std::integral_constant<Power, Power::kOne>{});
    case Power::kHalf: return f(std::integral_constant<Power, Power::kHalf>{});
    case Power::kGeneral: return f(std::integral_constant<Power, Power::kGeneral>{});
  }
}

// One parameter's averaging, and the memory order its step processes its tensors in:
// in_place_order's, where group_stride_of places the averaging groups in it, else
// nullopt (contiguous copies, whose groups are runs).
struct StepLayout {
  Averaging averaging;
  std::optional<MemoryOrder> order;
};

// `group`: the parameter's entry of fused_step_'s groups, 0 or a size whose groups tile
// the parameter (the kernels assume that no group runs past its end).
inline StepLayout step_layout_of(const std::vector<at::Tensor>& tensors, int64_t group) {
  const at::Tensor& param = tensors.front();
  TORCH_CHECK_VALUE(group >= 0, "adahessian::fused_step_: group ", group, " for a parameter of shape ", param.sizes(),
                    ": pass 0 (D per element) or a group size >= 1");
  TORCH_CHECK_VALUE(group == 0 || param.numel() % group == 0, "adahessian::fused_step_: groups of ", group,
                    " elements do not tile a parameter of shape ", param.sizes(), " (", param.numel(),
                    " elements): pass a group size that divides its number of elements, or 0 (D per element)");
  StepLayout layout{{group > 0, std::max<int64_t>(group, 1)}, in_place_order(tensors)};
  const auto stride = layout.order ? group_stride_of(param, layout.averaging.group) : 1;
  if (stride) {
    layout.averaging.stride = *stride;
  } else {
    layout.order = std::nullopt;
  }
  return layout;
}

// The scalars of one tensor's update exactly as the reference path forms them, in
// double (the kernels round them to their arithmetic type).
inline StepCoefficients<double> step_coefficients(int64_t step, double lr, double beta1, double beta2, double eps,
                                                  double weight_decay, double hessian_power) {
  const auto s = static_cast<double>(step);
  return {1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, 1 - std::pow(beta2, s),
          -lr / (1 - std::pow(beta1, s)), eps, hessian_power / 2};
}

// The coefficients rounded to the arithmetic type T, as the reference path's Python
// scalars are, each made a V (T itself, or a vector of T's on the CPU).
template <typename T, typename V = T>
StepCoefficients<V> rounded(const StepCoefficients<double>& c) {
  const auto r = [](double x) { return V(static_cast<T>(x)); };
  return {r(c.weight_decay_factor), r(c.beta1), r(c.one_minus_beta1), r(c.beta2), r(c.one_minus_beta2),
          r(c.bias_correction2), r(c.neg_step_size), r(c.eps), r(c.exponent)};
}

// The list lengths of rademacher_ and accumulate_hessian_: one tensor per key.
inline void check_one_per_key(const char* op, at::IntArrayRef keys, std::initializer_list<at::TensorList> lists) {
  for (const auto& list : lists)
    TORCH_CHECK(list.size() == keys.size(), "adahessian::", op, ": ", list.size(), " tensors, ", keys.size(), " keys");
}

// The bases of accumulate_hessian_: none (hzs are Hz), or one per Hz.
inline void check_bases(at::TensorList bases, at::TensorList hzs) {
  TORCH_CHECK(bases.empty() || bases.size() == hzs.size(), "adahessian::accumulate_hessian_: ", bases.size(),
              " bases for ", hzs.size(), " hzs (none, or one per hz)");
}

// The pointer to an optional tensor's data: null where it is undefined.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Tensor i of accumulate_hessian_, checked and staged (ContiguousViews): the CPU kernels
// keep the tensors, the CUDA kernels take their pointers.
struct StagedAccumulate {
  at::Tensor partial_sum, hz;
  at::Tensor base;  // defined when Hz is the finite difference (hz - base) * inv_step
  uint32_t key;
  MemoryOrder order;  // the tensors' common order: element offsets are memory offsets
};

inline StagedAccumulate stage_accumulate(size_t i, at::TensorList partial_sums, at::TensorList hzs,
                                         at::TensorList bases, at::IntArrayRef keys, ContiguousViews& views) {
  const at::Tensor& acc = partial_sums[i];
  check_like(acc, hzs[i], at::toOpMathType(hzs[i].scalar_type()), "partial_sums");
  if (!bases.empty()) check_like(bases[i], hzs[i], hzs[i].scalar_type(), "bases");
  const auto order = in_place_order({acc});
  return {views.write(acc, order), views.read(hzs[i], order, acc),
          bases.empty() ? at::Tensor() : views.read(bases[i], order, acc), checked_key(keys[i]),
          order.value_or(MemoryOrder{})};
}

// The arguments of fused_step_ (csrc/ops.cpp) that its checks and staging read.
struct StepArguments {
  at::TensorList params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, bases, partial_sums;
  at::IntArrayRef keys, steps;
  double lr, beta1, beta2, eps, weight_decay, hessian_power;
  int64_t n_samples;
  at::IntArrayRef groups;

  bool hessian_step() const { return !hzs.empty(); }
};

// The list lengths of fused_step_.
inline void check_step_arguments(const StepArguments& a) {
  const size_t count = a.params.size();
  TORCH_CHECK(a.grads.size() == count && a.exp_avgs.size() == count && a.exp_hessian_diag_sqs.size() == count &&
                  a.steps.size() == count,
              "adahessian::fused_step_: params, grads, exp_avgs, exp_hessian_diag_sqs and steps must have the "
              "same length");
  TORCH_CHECK(a.hessians.empty() || a.hessians.size() == count,
              "adahessian::fused_step_: hessians must be empty or one per parameter");
  TORCH_CHECK(a.hessian_step() || a.hessians.size() == count,
              "adahessian::fused_step_: a step without hzs reads D from hessians, which is empty");
  TORCH_CHECK(!a.hessian_step() || (a.hzs.size() == count && a.keys.size() == count),
              "adahessian::fused_step_: a Hessian step needs one hz and one key per parameter");
  TORCH_CHECK(a.bases.empty() || (a.hessian_step() && a.bases.size() == count),
              "adahessian::fused_step_: bases are one per parameter on Hessian steps whose Hz is a finite "
              "difference, else empty");
  TORCH_CHECK(a.hessian_step() && a.n_samples > 1 ? a.partial_sums.size() == count : a.partial_sums.empty(),
              "adahessian::fused_step_: partial_sums are one per parameter on Hessian steps with n_samples > 1, "
              "else empty");
  TORCH_CHECK_VALUE(a.groups.size() == count, "adahessian::fused_step_: groups has ", a.groups.size(),
                    " entries, params ", count, ": pass one group size per parameter (0: D per element)");
}

// Parameter i of fused_step_, checked (device, shape, dtype) and staged: its tensors
// through `views` (in place, or contiguous copies written back at views.finish()) and
// its scalars. The CPU kernels keep the tensors, the CUDA kernels take their pointers.
struct StagedStep {
  at::Tensor param, grad, exp_avg, exp_hessian_diag_sq;
  at::Tensor hessian;      // D kept for later steps; undefined when not kept
  at::Tensor hz;           // undefined on steps that reuse the kept D
  at::Tensor base;         // defined when Hz is the finite difference (hz - base) * inv_step
  at::Tensor partial_sum;  // undefined when n_samples == 1
  uint32_t key = 0;
  MemoryOrder order;  // the tensors' common order: element offsets are memory offsets
  Averaging averaging;
  StepCoefficients<double> coefficients;
};

inline StagedStep stage_step(size_t i, const StepArguments& a, ContiguousViews& views) {
  const at::Tensor& p = a.params[i];
  const at::ScalarType state = at::toOpMathType(p.scalar_type());
  const bool kept = !a.hessians.empty(), hessian_step = a.hessian_step();
  check_like(a.grads[i], p, p.scalar_type(), "grads");
  check_like(a.exp_avgs[i], p, state, "exp_avgs");
  check_like(a.exp_hessian_diag_sqs[i], p, state, "exp_hessian_diag_sqs");
  if (kept) check_like(a.hessians[i], p, state, "hessians");
  if (hessian_step) check_like(a.hzs[i], p, p.scalar_type(), "hzs");
  if (!a.bases.empty()) check_like(a.bases[i], p, p.scalar_type(), "bases");
  if (!a.partial_sums.empty()) check_like(a.partial_sums[i], p, state, "partial_sums");

  // The order is decided by the tensors written; the kept D is written on Hessian steps,
  // and made like the others.
  const auto layout = step_layout_of({p, a.exp_avgs[i], a.exp_hessian_diag_sqs[i], kept ? a.hessians[i] : at::Tensor()},
                                     a.groups[i]);
  const auto& order = layout.order;
  StagedStep s;
  s.averaging = layout.averaging;
  s.order = order.value_or(MemoryOrder{});
  s.param = views.write(p, order);
  s.grad = views.read(a.grads[i], order, p);
  s.exp_avg = views.write(a.exp_avgs[i], order);
  s.exp_hessian_diag_sq = views.write(a.exp_hessian_diag_sqs[i], order);
  if (kept) s.hessian = hessian_step ? views.write(a.hessians[i], order) : views.read(a.hessians[i], order, p);
  if (hessian_step) {
    s.hz = views.read(a.hzs[i], order, p);
    if (!a.bases.empty()) s.base = views.read(a.bases[i], order, p);
    s.key = checked_key(a.keys[i]);
    if (!a.partial_sums.empty()) s.partial_sum = views.read(a.partial_sums[i], order, p);
  }
  s.coefficients = step_coefficients(a.steps[i], a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.hessian_power);
  return s;
}

}  // namespace adahessian
