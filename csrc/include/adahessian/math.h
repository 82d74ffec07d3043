// The per-element math of the fused AdaHessian kernels (docs/algorithm.md): the pinned
// Rademacher hash (section 2), the Hutchinson estimate, conv-kernel averaging and the
// update (section 1). One source of truth for every backend: the CPU kernels instantiate
// these templates with at::vec::Vectorized lanes, CUDA kernels with plain scalars.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace adahessian {

constexpr uint32_t kGolden = 0x9E3779B9u;

// MurmurHash3's 32-bit finaliser (unsigned arithmetic wraps modulo 2^32).
C10_HOST_DEVICE inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The hash of the high 32 bits of the logical index: constant over 2^32 elements, so
// kernels compute it once per run of elements rather than once per element.
C10_HOST_DEVICE inline uint32_t rademacher_base(uint32_t key, uint64_t index) {
  return fmix32(key ^ static_cast<uint32_t>(index >> 32));
}

// z[index] = +1 or -1, given rademacher_base(key, index).
template <typename T>
C10_HOST_DEVICE inline T rademacher_sign(uint32_t base, uint64_t index) {
  return (fmix32(static_cast<uint32_t>(index) * kGolden + base) & 1u) ? T(-1) : T(1);
}

// Hz of a finite difference (README, "Without double backward"): the gradient at
// theta + eps z minus `base` (the gradient at theta, or at theta - eps z), times
// inv_step (1 / eps, or 1 / (2 eps)), in the reference path's order. Kernels apply it
// only where a base is given: without one they read Hz itself.
template <typename T>
C10_HOST_DEVICE inline T difference_quotient(T plus, T base, T inv_step) {
  return (plus - base) * inv_step;
}

// D of the last Hutchinson sample, in the reference path's order of operations:
// (sum of z * Hz over the earlier samples + z * Hz) / n_samples. Kernels pass
// identities (0, 1) for absent terms: they change no bits.
template <typename T>
C10_HOST_DEVICE inline T hessian_estimate(T z, T hz, T partial_sum, T n_samples) {
  return (partial_sum + z * hz) / n_samples;
}

// Scalars of one tensor's update, computed once per call on the host (in double, then
// rounded to the arithmetic type as the reference path's Python scalars are).
template <typename T>
struct StepCoefficients {
  T weight_decay_factor;  // 1 - lr * weight_decay
  T beta1, one_minus_beta1;
  T beta2, one_minus_beta2;
  T bias_correction2;     // 1 - beta2^step
  T neg_step_size;        // -lr / (1 - beta1^step)
  T eps;
  T exponent;             // hessian_power / 2
};

// (v / bias_correction2)^(hessian_power / 2) has fast paths for the common powers.
enum class Power { kOne, kHalf, kGeneral };

// sqrt and pow of scalars; the CPU kernels pass a policy of the same shape for vectors.
struct ScalarMath {
  template <typename T>
  C10_HOST_DEVICE static T sqrt(T x) { return ::sqrt(x); }
  template <typename T>
  C10_HOST_DEVICE static T pow(T x, T y) { return ::pow(x, y); }
};

// Conv-kernel averaging (section 1, step 2): the mean of |d(k)| over k < group. The sum
// runs in segments of kSegment elements: each segment summed in order, then the segment
// sums in order, then one division. Up to kSegment elements (3x3, 5x5 kernels) that is
// the plain sum in order; beyond, it is the order in which CUDA threads sum a large
// group's segments side by side and then combine them (csrc/cuda/kernels.cuh), so that
// every backend rounds alike. (Rounding: at most (group - 1) u for the sum, as in any
// order; tests/tolerances.py.)
constexpr int64_t kSegment = 32;

// The sum of |d(k)| for begin <= k < end, in order: one segment.
template <typename T, typename D>
C10_HOST_DEVICE inline T segment_sum_abs(int64_t begin, int64_t end, const D& d) {
  T sum = 0;
  for (int64_t k = begin; k < end; ++k) sum += std::abs(d(k));
  return sum;
}

// Segments in one group of `group` elements.
C10_HOST_DEVICE inline int64_t segments_of(int64_t group) { return (group + kSegment - 1) / kSegment; }

// The group's mean from its segment sums seg(0 .. segments_of(group) - 1), in order.
template <typename T, typename S>
C10_HOST_DEVICE inline T mean_of_segments(int64_t group, const S& seg) {
  T sum = 0;
  for (int64_t s = 0; s < segments_of(group); ++s) sum += seg(s);
  return sum / static_cast<T>(group);
}

// The same sum fed one element at a time, k = 0 .. group - 1 in order (a thread or a
// vector lane that walks a whole group): segment and sum start at 0; after the last
// element, sum is what mean_of_segments adds up, rounding for rounding.
template <typename T>
C10_HOST_DEVICE inline void add_to_group_sum(int64_t k, int64_t group, T abs_d, T& segment, T& sum) {
  segment = segment + abs_d;
  if ((k + 1) % kSegment == 0 || k + 1 == group) {
    sum = sum + segment;
    segment = T(0);
  }
}

template <typename T, typename D>
C10_HOST_DEVICE inline T group_mean_abs(int64_t group, const D& d) {
  T segment = 0, sum = 0;
  for (int64_t k = 0; k < group; ++k) add_to_group_sum<T>(k, group, std::abs(d(k)), segment, sum);
  return sum / static_cast<T>(group);
}

// One element of AdaHessian's update (section 1, steps 3-5) given D, in place on
// the parameter p and the moments m and v; grad is still multiplied by the loss scale.
template <Power power, typename Math = ScalarMath, typename T>
C10_HOST_DEVICE inline void adahessian_update(T& p, T& m, T& v, T grad, T d, const StepCoefficients<T>& c) {
  p = p * c.weight_decay_factor;
  m = m * c.beta1 + grad * c.one_minus_beta1;
  v = v * c.beta2 + c.one_minus_beta2 * d * d;
  T v_hat = v / c.bias_correction2;
  T denom;
  if constexpr (power == Power::kOne) {
    denom = Math::sqrt(v_hat);
  } else if constexpr (power == Power::kHalf) {
    denom = Math::sqrt(Math::sqrt(v_hat));
  } else {
    denom = Math::pow(v_hat, c.exponent);
  }
  denom = denom + c.eps;
  p = p + c.neg_step_size * m / denom;
}

}  // namespace adahessian
