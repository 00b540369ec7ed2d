// fastmerge CPU backend: the DARE keep-bit memo (see dare_bits.h).
#include "dare_bits.h"

#include <mutex>
#include <vector>

namespace fastmerge {
namespace cpu {
namespace {

struct Entry {
  DareBitsKey key;
  bool complete = false;
  std::shared_ptr<std::vector<uint64_t>> words;
};

struct Memo {
  std::mutex mu;
  std::vector<Entry*> entries;  // oldest first
  size_t bytes = 0;
  size_t limit = size_t{64} << 20;
};

Memo& memo() {
  static Memo* m = new Memo();
  return *m;
}

bool same(const DareBitsKey& a, const DareBitsKey& b) {
  return a.key_lo == b.key_lo && a.key_hi == b.key_hi && a.threshold == b.threshold &&
         a.offset == b.offset && a.numel == b.numel;
}

size_t words_of(const DareBitsKey& k) { return static_cast<size_t>((k.numel + 63) / 64); }

void erase_at(Memo& m, size_t i) {  // caller holds mu
  m.bytes -= m.entries[i]->words->size() * sizeof(uint64_t);
  delete m.entries[i];
  m.entries.erase(m.entries.begin() + static_cast<std::ptrdiff_t>(i));
}

void erase_key(Memo& m, const DareBitsKey& key) {  // caller holds mu
  for (size_t i = 0; i < m.entries.size(); ++i) {
    if (same(m.entries[i]->key, key)) {
      erase_at(m, i);
      return;
    }
  }
}

}  // namespace

std::shared_ptr<std::vector<uint64_t>> dare_bits_begin(const DareBitsKey& key) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  erase_key(m, key);
  const size_t need = words_of(key) * sizeof(uint64_t);
  if (key.numel <= 0 || m.bytes + need > m.limit) return nullptr;
  Entry* e = new Entry();
  e->key = key;
  e->words = std::make_shared<std::vector<uint64_t>>(words_of(key), 0);
  m.entries.push_back(e);
  m.bytes += need;
  return e->words;
}

void dare_bits_complete(const DareBitsKey& key) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  for (Entry* e : m.entries)
    if (same(e->key, key)) e->complete = true;
}

std::shared_ptr<const std::vector<uint64_t>> dare_bits_find(const DareBitsKey& key) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  for (Entry* e : m.entries)
    if (e->complete && same(e->key, key)) return e->words;
  return nullptr;
}

void dare_bits_drop(const DareBitsKey& key) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  erase_key(m, key);
}

size_t dare_bits_limit(size_t bytes) {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  const size_t prev = m.limit;
  m.limit = bytes;
  while (!m.entries.empty() && m.bytes > m.limit) erase_at(m, 0);
  return prev;
}

size_t dare_bits_bytes() {
  Memo& m = memo();
  std::lock_guard<std::mutex> lock(m.mu);
  return m.bytes;
}

}  // namespace cpu
}  // namespace fastmerge
