// Dense tensors stored in another dimension order than the logical one (channels-last
// conv weights, transposed matrices) are processed in memory order, in place: every
// per-element quantity but z is independent of the element's position, and z needs its
// logical row-major index (docs/algorithm.md, section 2), recovered here from the memory
// offset. Shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace adahessian {

constexpr int kMaxDims = 8;

struct MemoryOrder {
  int dims = 0;                       // 0: memory order is the logical order
  int64_t sizes[kMaxDims];            // the dimensions of size > 1, outermost in memory first
  int64_t logical_strides[kMaxDims];  // their strides in the logical row-major order
  bool narrow = false;                // fewer than 2^32 elements: logical() divides in 32 bits

  // The logical index of the element at this memory offset (from the tensor's start).
  C10_HOST_DEVICE int64_t logical(int64_t offset) const {
    if (dims == 0) return offset;
    // A GPU's 64-bit division is a long software routine, its 32-bit one a few instructions.
    return narrow ? static_cast<int64_t>(logical_as<uint32_t>(static_cast<uint32_t>(offset))) : logical_as(offset);
  }

 private:
  template <typename I>
  C10_HOST_DEVICE I logical_as(I offset) const {
    I index = 0;
    for (int d = dims - 1; d >= 0; --d) {
      const I size = static_cast<I>(sizes[d]);
      const I outer = offset / size;
      index += (offset - outer * size) * static_cast<I>(logical_strides[d]);
      offset = outer;
    }
    return index;
  }
};

}  // namespace adahessian
