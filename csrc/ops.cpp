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
  // partial_sums[i] += z * Hz, z regenerated from keys[i] (a Hutchinson sample but the last).
  // Hz is hzs[i], or with bases given the finite difference (hzs[i] - bases[i]) * inv_step:
  // the gradients at theta + eps z and at theta (or theta - eps z), and 1 / eps (or 1 / (2 eps)).
  m.def(
      "accumulate_hessian_(Tensor(a!)[] partial_sums, Tensor[] hzs, Tensor[] bases, int[] keys, float inv_step) -> ()",
      {at::Tag::cudagraph_unsafe});
  // One AdaHessian step per parameter (docs/algorithm.md, section 1), one pass over memory each.
  // groups: one per parameter, how its D is averaged (adahessian/averaging.py decides;
  // the kernels only apply it): 0 keeps D per element, signed; g >= 1 replaces each
  // element's D by the mean |D| of its group of g consecutive elements in logical
  // row-major order (1: |D|), g dividing the parameter's size (ValueError otherwise).
  // Hessian step: hzs and keys given, D = (partial_sums + z * Hz) / n_samples,
  // stored into hessians when given, Hz read as accumulate_hessian_ reads it (bases empty
  // or one per parameter). Other steps: hzs and bases empty, D read from hessians.
  // steps: each parameter's step count after this step. Gradients and Hz come unscaled:
  // adahessian/amp.py unscales and decides GradScaler skips before any kernel runs.
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_hessian_diag_sqs, Tensor(d!)[] hessians, Tensor[] hzs, Tensor[] bases, "
      "Tensor[] partial_sums, int[] keys, int[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, float hessian_power, int n_samples, float inv_step, int[] groups) -> ()",
      {at::Tag::cudagraph_unsafe});
}
