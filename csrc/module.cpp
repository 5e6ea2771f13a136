// The Python module `dpo_kernels._C`: importing it runs the TORCH_LIBRARY registrations; the ops are then reached
// as torch.ops.dpo_kernels.*. Its one function, hyper_param_names(), returns the names of enum HyperParam
// (dpo_loss_math.h) in its order, the order in which the op reads each loss type's hyper-parameters, so that a test
// can compare it with HYPER_PARAMS.
#include <Python.h>

#include "dpo_loss_math.h"

namespace {

PyObject* hyper_param_names(PyObject* /*self*/, PyObject* /*args*/) {
  PyObject* names = PyTuple_New(dpo_kernels::kNumHyperParams);
  if (names == nullptr) return nullptr;
  for (int i = 0; i < dpo_kernels::kNumHyperParams; ++i) {
    const char* name = dpo_kernels::hyper_param_name(static_cast<dpo_kernels::HyperParam>(i));
    if (name == nullptr) {
      PyErr_Format(PyExc_RuntimeError, "enum HyperParam value %d has no name in hyper_param_name (dpo_loss_math.h)",
                   i);
    }
    PyObject* item = name == nullptr ? nullptr : PyUnicode_FromString(name);
    if (item == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyTuple_SET_ITEM(names, i, item);
  }
  return names;
}

PyMethodDef methods[] = {
    {"hyper_param_names", hyper_param_names, METH_NOARGS,
     "The loss op's hyper-parameter names in the order it reads them (enum HyperParam)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
