// batchnorm_ext._C: importing this module loads the shared library, and loading it runs
// the TORCH_LIBRARY registrations in ops.cpp, batch_norm_cpu.cpp, autograd.cpp and
// fallback.cpp.  The operators are reached through torch.ops.batchnorm_ext; the module
// itself only tells which instruction set the kernels use, and lets tests and benchmarks
// pick a lesser one.
#include <Python.h>

#include "cpu/kernel_api.h"

#include <exception>

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(batchnorm_ext::cpu::cpu_capability().c_str());
}

PyObject* set_cpu_capability(PyObject*, PyObject* name) {
  const char* text = PyUnicode_AsUTF8(name);
  if (text == nullptr) return nullptr;  // not a str: the TypeError is set
  try {
    batchnorm_ext::cpu::set_cpu_capability(text);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* built_capabilities(PyObject*, PyObject*) {
  return PyUnicode_FromString(batchnorm_ext::cpu::built_capabilities().c_str());
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set the kernels use: 'AVX512_BF16', 'AVX512', 'AVX2' or 'DEFAULT'."},
    {"built_capabilities", built_capabilities, METH_NOARGS,
     "The instruction sets kernels were built for, comma-separated, best first."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Use the kernels built for this instruction set (one the CPU supports)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
