// The pipeline's check of every merged output chunk for NaN/Inf (an overflow of the output
// dtype from finite inputs): one pass over the bits that the compiler vectorises, since a value
// is NaN or Inf iff all its exponent bits are set.
#include "fastmerge_params.h"
#include "fm_cpu.h"

namespace fastmerge {
namespace cpu {
namespace {

template <typename U>
int64_t count_bits(const U* x, int64_t n, U exponent, int64_t* first) {
  // every bit but the sign (cast before the shift: ~ promotes a uint16_t to int)
  const U magnitude = static_cast<U>(static_cast<U>(~U{0}) >> 1);
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += (x[j] & magnitude) >= exponent;
  *first = -1;
  if (count > 0) {  // only then: the position for the error message
    for (int64_t j = 0; j < n; ++j) {
      if ((x[j] & magnitude) >= exponent) {
        *first = j;
        break;
      }
    }
  }
  return count;
}

}  // namespace

int64_t count_nonfinite_values(const void* data, int64_t n, int dtype, int64_t* first) {
  switch (dtype) {
    case DTYPE_FLOAT32:
      return count_bits(static_cast<const uint32_t*>(data), n, uint32_t{0x7F800000u}, first);
    case DTYPE_FLOAT16:
      return count_bits(static_cast<const uint16_t*>(data), n, uint16_t{0x7C00u}, first);
    default: return count_bits(static_cast<const uint16_t*>(data), n, uint16_t{0x7F80u}, first);
  }
}

}  // namespace cpu
}  // namespace fastmerge
