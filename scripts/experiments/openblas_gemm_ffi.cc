// A row-major float32 GEMM for XLA:CPU through the XLA FFI, calling an OpenBLAS cblas_sgemm (64-bit ints)
// loaded at run time (numpy's bundled OpenBLAS). An experiment: what the per-step products would cost at
// BLAS speed inside the compiled train step.
#include <dlfcn.h>
#include <cstdint>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
typedef void (*sgemm_t)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                        int64_t, float, float*, int64_t);
static sgemm_t g_sgemm = nullptr;

extern "C" int nrnn_load_blas(const char* path, const char* symbol) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return 1;
  g_sgemm = reinterpret_cast<sgemm_t>(dlsym(lib, symbol));
  return g_sgemm ? 0 : 2;
}

// C (m, n) = op(A) op(B); A row-major (m, k) or, transposed, (k, m); B (k, n) or, transposed, (n, k)
static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                       bool trans_a, bool trans_b) {
  auto da = a.dimensions();
  auto db = b.dimensions();
  int64_t m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  int64_t n = trans_b ? db[0] : db[1];
  g_sgemm(101, trans_a ? 112 : 111, trans_b ? 112 : 111, m, n, k, 1.0f, a.typed_data(), da[1], b.typed_data(),
          db[1], 0.0f, c->typed_data(), n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(NrnnGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
