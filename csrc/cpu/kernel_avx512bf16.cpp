// The kernels (batch_norm_kernel.h and the headers it includes) built for one instruction
// set; setup.py adds the matching -m flags and CPU_CAPABILITY for files named
// kernel_<isa>.cpp.  This one, AVX-512 with the bfloat16 conversion instructions, only for
// bfloat16 input: the other dtypes run the AVX512 build's kernels (see dispatch_dtypes).
#define BATCHNORM_EXT_BFLOAT16_ONLY
#include "batch_norm_kernel.h"
