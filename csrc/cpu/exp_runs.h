// The exponential of a run of values in place, on the host: AVX2/FMA eight lanes at a time where the
// processor has them (checked once, at run time), the C library's exp otherwise. Declared for every
// compiler (nvcc's host pass sees the callers); defined in csrc/cpu/exp_runs.cpp.
#pragma once

#include <cstdint>

namespace dmlfast {

// v[i] = e^{v[i]} for i < n. Float: within 2 ulp of the rounded exact value (1.5 ulp measured),
// 0 below -104, inf above 88.73, NaN kept. Double: the C library's exp.
void exp_in_place(float* v, int64_t n);
void exp_in_place(double* v, int64_t n);

// Whether exp_in_place(float*) uses its AVX2 lanes on this processor.
bool exp_in_place_is_vectorized();

}  // namespace dmlfast
