// The adahessian operator library: schemas only. Kernels register per dispatch key
// (csrc/cpu for CPU); fake (meta) implementations are registered from Python
// (adahessian/_ops.py). Tensor lists are per parameter; an empty list means "absent".
// Every op is tagged cudagraph_unsafe (Inductor splits its CUDA graphs around them): the
// CUDA kernels upload their table from host memory on every call and refuse capture.
#include <Python.h>
#include <torch/library.h>

// Importing adahessian._C loads this library, whose static initialisers register the
// ops; the module itself is empty (the pytorch/extension-cpp layout).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(adahessian, m) {
  // out[i][j] = the pinned Rademacher sign of (keys[i], logical index j) (docs/algorithm.md, section 2).
  m.def("rademacher_(Tensor(a!)[] out, int[] keys) -> ()", {at::Tag::cudagraph_unsafe});
  // partial_sums[i] += z * hzs[i], z regenerated from keys[i] (a Hutchinson sample but the last).
  m.def("accumulate_hessian_(Tensor(a!)[] partial_sums, Tensor[] hzs, int[] keys) -> ()", {at::Tag::cudagraph_unsafe});
  // One AdaHessian step per parameter (docs/algorithm.md, section 1), one pass over memory each.
  // Hessian step: hzs and keys given, D = (partial_sums + z * Hz) / n_samples,
  // stored into hessians when given. Other steps: hzs empty, D read from hessians.
  // steps: each parameter's step count after this step. Gradients and Hz come unscaled:
  // adahessian/amp.py unscales and decides GradScaler skips before any kernel runs.
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hessian_diag_sqs, Tensor(d!)[] hessians, Tensor[] hzs, Tensor[] partial_sums, "
      "int[] keys, int[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float hessian_power, int n_samples, bool average_conv_kernel) -> ()",
      {at::Tag::cudagraph_unsafe});
}
