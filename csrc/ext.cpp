// The Python module fastctx._C. It holds no bindings of its own: importing it runs the static
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL registrations of every op under csrc/, after which
// the ops are reachable as torch.ops.fastctx.<name>.
#include <Python.h>

static struct PyModuleDef fastctx_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastctx_c_module); }
