// The Python module `dpo_kernels._C`: importing it runs the TORCH_LIBRARY registrations; the ops are then reached
// as torch.ops.dpo_kernels.*. It defines no Python functions of its own.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
