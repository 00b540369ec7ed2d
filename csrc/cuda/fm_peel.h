// fastmerge CUDA backend: the unaligned head a launch peels so the rest keeps vector loads.
//
// A chunk view at an odd element offset misaligns every pointer of a call by the same number of
// elements. Rather than sending the whole call through element loads, the launchers run the
// first h < EPT elements with element loads and the rest with every pointer advanced by h
// elements, where each pointer is aligned to its group's vector width. Host-only and free of
// CUDA headers, so tests/test_gpu_peel.py compiles it with the system C++ compiler.
#pragma once

#include <stdint.h>

namespace fmpeel {

// One tensor of a launch: its first element (nullptr: absent) and its element size in bytes.
struct Span {
  const void* ptr;
  int elem_bytes;
};

// The alignment a group of `ept` elements needs for its vector load or store: the group's
// bytes, at most 16 (a wider group is several 16-byte accesses).
inline int64_t vector_align(int ept, int elem_bytes) {
  const int64_t bytes = static_cast<int64_t>(ept) * elem_bytes;
  return bytes < 16 ? bytes : 16;
}

// The smallest h in [0, ept) after which every present span is aligned to its vector width;
// -1 when no h serves them all (views at different element offsets, or a pointer that is not
// even element-aligned).
inline int peel_head(const Span* spans, int count, int ept) {
  for (int h = 0; h < ept; ++h) {
    bool ok = true;
    for (int i = 0; ok && i < count; ++i) {
      if (spans[i].ptr == nullptr) continue;
      const uintptr_t at = reinterpret_cast<uintptr_t>(spans[i].ptr) +
                           static_cast<uintptr_t>(h) * static_cast<uintptr_t>(spans[i].elem_bytes);
      ok = at % static_cast<uintptr_t>(vector_align(ept, spans[i].elem_bytes)) == 0;
    }
    if (ok) return h;
  }
  return -1;
}

// How one call over `numel` elements is launched: elements [0, head) with element loads (when
// head > 0), then [head, numel) with vector loads when `vec_ok`.
struct Plan {
  int64_t head;
  bool vec_ok;
};

inline Plan plan(const Span* spans, int count, int ept, int64_t numel) {
  const int h = peel_head(spans, count, ept);
  if (h < 0 || h >= numel) return Plan{0, false};  // nothing to vectorise: element loads
  return Plan{h, true};
}

// The element offset at which to place a fresh output of `out_bytes`-byte elements (its
// storage aligned to 16 bytes) so that it is misaligned like the inputs: the same head then
// aligns it too. 0 when the inputs need no head or no head serves them.
inline int out_shift(const Span* inputs, int count, int ept, int out_bytes) {
  const int h = peel_head(inputs, count, ept);
  if (h <= 0) return 0;
  const int64_t align = vector_align(ept, out_bytes);
  for (int k = 0; k < ept; ++k)
    if ((static_cast<int64_t>(k) + h) * out_bytes % align == 0) return k;
  return 0;
}

}  // namespace fmpeel
