// Makes the shared library importable as the Python module ddpm_fast._C; importing it runs the
// static TORCH_LIBRARY registrations. The ops are reached through torch.ops.ddpm_fast.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
