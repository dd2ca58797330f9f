// The kernels (batch_norm_kernel.h and the headers it includes) built for one instruction
// set; setup.py adds the matching -m flags and CPU_CAPABILITY for files named
// kernel_<isa>.cpp.
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#include "batch_norm_kernel.h"
