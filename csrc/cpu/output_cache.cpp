// fastmerge CPU backend: the freed-output cache (see output_cache.h).
#include "output_cache.h"

#include <stdlib.h>

#include <mutex>
#include <vector>

namespace fastmerge {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;
constexpr size_t kMaxBuffers = 2;

struct Cache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> free_list;  // most recently released last
  size_t bytes = 0;
  size_t limit = size_t{256} << 20;

  void trim() {  // caller holds mu
    while (!free_list.empty() && (bytes > limit || free_list.size() > kMaxBuffers)) {
      bytes -= free_list.front().second;
      free(free_list.front().first);
      free_list.erase(free_list.begin());
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: tensors may be freed at exit
  return *c;
}

}  // namespace

void* output_acquire(size_t bytes) {
  if (bytes < kMinBytes) return nullptr;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (size_t i = c.free_list.size(); i-- > 0;) {
      if (c.free_list[i].second == bytes) {
        void* p = c.free_list[i].first;
        c.free_list.erase(c.free_list.begin() + static_cast<std::ptrdiff_t>(i));
        c.bytes -= bytes;
        return p;
      }
    }
  }
  return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

void output_release(void* p, size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (bytes > c.limit) {
    free(p);
    return;
  }
  c.free_list.emplace_back(p, bytes);
  c.bytes += bytes;
  c.trim();
}

size_t output_cache_limit(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const size_t prev = c.limit;
  c.limit = bytes;
  c.trim();
  return prev;
}

size_t output_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.bytes;
}

}  // namespace cpu
}  // namespace fastmerge
