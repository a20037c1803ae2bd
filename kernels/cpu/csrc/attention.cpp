// Work split of the row-invariant CPU attention (attention_kernel.h): work items and threads.
//
// Work item = (sequence b, kv head g, a tile of rows, one absolute key block). Items are pulled from an
// atomic counter by however many threads run, and whoever finishes the last block of a tile combines
// that tile's rows. Which thread computes what never changes a bit: an item's partials are a function of
// the item alone, and the combine reads them in a fixed order.
// No torch header (threads: pool.h): tensors and pybind stay in bindings.cpp.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "attention.h"
#include "dispatch.h"
#include "pool.h"
#include "simd.h"

namespace {

using specedit_cpu::ATT_KB;
using specedit_cpu::ATT_SB;
using specedit_cpu::AttnProblem;

constexpr int64_t QMAX = 32;  // queries (rows x heads of a kv group) per tile: their scores stay in L2
// Below this many (query, key) pairs per thread a second thread costs more than it saves. Measured on
// Zen 5, T = 1, 9 heads: 2 threads break even at ~250 keys (2.3K pairs) and win 1.3x at 600 keys.
constexpr int64_t MIN_PAIRS_PER_THREAD = 1024;

struct Tile {
  int64_t b, g, t0, t1, blk0;
  int64_t first_item;
};

}  // namespace

namespace specedit_cpu {

namespace {

// One pass over all rows of P (P.part must hold rows * H * nblk * (D + 2) floats, see AttnProblem).
void run_rows(AttnProblem P, int64_t isa, int64_t nblk, float* part) {
  const int64_t B = P.B, H = P.H, Hkv = P.Hkv, D = P.D, window = P.window;
  const int64_t* lengths = P.lengths;
  const int64_t G = H / Hkv;
  const int64_t rows = std::max<int64_t>(1, QMAX / G);  // rows per tile

  // tiles and their items (one per key block the tile's rows see)
  std::vector<Tile> tiles;
  std::vector<int32_t> item_tile;
  int64_t pairs = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t T = P.rows ? P.rows[b] : P.T;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t t0 = 0; t0 < T; t0 += rows) {
        const int64_t t1 = std::min(T, t0 + rows);
        const int64_t hi = lengths[b] - T + t1 - 1;
        const int64_t lo = window > 0 ? std::max<int64_t>(0, lengths[b] - T + t0 - window + 1) : 0;
        tiles.push_back({b, g, t0, t1, lo / ATT_KB, (int64_t)item_tile.size()});
        for (int64_t k0 = lo / ATT_KB; k0 <= hi / ATT_KB; ++k0) item_tile.push_back((int32_t)tiles.size() - 1);
        pairs += (hi - lo + 1) * (t1 - t0) * G;
      }
  }
  const int64_t nitems = (int64_t)item_tile.size();

  P.nblk = nblk;
  P.part = part;

  AttnBlock::Fn* const block = kernel<AttnBlock>(isa);
  AttnCombine::Fn* const combine = kernel<AttnCombine>(isa);
  const size_t scratch_size = (size_t)(rows * G * (D + ATT_KB + ATT_SB) + D * ATT_SB + nblk + 64);

  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[tiles.size()]);
  for (size_t i = 0; i < tiles.size(); ++i) {
    const int64_t end = i + 1 < tiles.size() ? tiles[i + 1].first_item : nitems;
    left[i].store(end - tiles[i].first_item, std::memory_order_relaxed);
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    // A fixed floating-point environment: round to nearest, no flush-to-zero / denormals-are-zero (MXCSR is
    // per thread: a caller's torch.set_flush_denormal must not make threads disagree).
    MxcsrScope env(mxcsr() & ~(MXCSR_FTZ | MXCSR_DAZ | MXCSR_ROUNDING));
    static thread_local std::vector<float> scratch;
    if (scratch.size() < scratch_size) scratch.resize(scratch_size);
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < nitems;) {
      const Tile& tl = tiles[item_tile[i]];
      block(P, tl.b, tl.g, tl.t0, tl.t1, tl.blk0 + (i - tl.first_item), scratch.data());
      if (left[item_tile[i]].fetch_sub(1, std::memory_order_acq_rel) == 1)  // the tile's last block: combine
        combine(P, tl.b, tl.g, tl.t0, tl.t1, scratch.data());
    }
  };
  const int64_t nw = std::min<int64_t>({pool_threads(), nitems,
                                        std::max<int64_t>(1, pairs / MIN_PAIRS_PER_THREAD)});
  if (nw <= 1) {
    worker();
  } else {
    run_tasks(nw, nw, [&](int64_t) { worker(); });
  }
}

}  // namespace

// Fills P.out (see AttnProblem; P.part and P.nblk are set here). The caller (bindings.cpp, where the
// torch bindings live) has checked every shape, stride and length. isa: ISA_AVX2 or ISA_AVX512.
void attention_run(AttnProblem P, int64_t isa) {
  const int64_t B = P.B, T = P.T, H = P.H, D = P.D;
  int64_t maxlen = 0, nrows = P.rows ? 0 : B * T;  // nrows: rows of the partials
  for (int64_t b = 0; b < B; ++b) {
    maxlen = std::max(maxlen, P.lengths[b]);
    if (P.rows) nrows = std::max(nrows, P.first[b] + P.rows[b]);
  }
  if (nrows == 0 || H == 0) return;
  const int64_t nblk = (maxlen + ATT_KB - 1) / ATT_KB;
  // The partials take rows * H * nblk * (D + 2) floats: 5 MB for a verify pass of 65 rows over 8k keys
  // (SmolLM2), but 0.6 GB for a prefill of 8k rows. Rows are independent, so long calls go in chunks of
  // rows whose partials fit PART_BYTES; every row's bits stay the same.
  constexpr int64_t PART_BYTES = 32 << 20;
  const int64_t per_row = H * nblk * (D + 2);
  static thread_local std::vector<float> part_buf;  // grows, never shrinks: no page faults per call
  if (P.rows) {
    if (nrows * per_row <= PART_BYTES / 4) {
      if ((int64_t)part_buf.size() < nrows * per_row) part_buf.resize(nrows * per_row);
      return run_rows(P, isa, nblk, part_buf.data());
    }
    for (int64_t b = 0; b < B; ++b) {  // a long prefill in the batch: one problem per sequence, in chunks
      AttnProblem C = P;
      C.rows = C.first = nullptr;
      C.B = 1, C.T = P.rows[b];
      C.q = P.q + b * P.sq_b + P.first[b] * P.sq_t;
      C.out = P.out + b * P.so_b + P.first[b] * P.so_t;
      C.k = P.k + b * P.sk_b, C.v = P.v + b * P.sv_b;
      C.lengths = P.lengths + b;
      attention_run(C, isa);
    }
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(T, PART_BYTES / 4 / (B * per_row)));
  if ((int64_t)part_buf.size() < chunk * B * per_row) part_buf.resize(chunk * B * per_row);
  if (chunk == T) return run_rows(P, isa, nblk, part_buf.data());
  std::vector<int64_t> lengths(B);
  for (int64_t r0 = 0; r0 < T; r0 += chunk) {  // rows [r0, r1) as a call of their own
    const int64_t r1 = std::min(T, r0 + chunk);
    AttnProblem C = P;
    C.T = r1 - r0;
    for (int64_t b = 0; b < B; ++b) lengths[b] = P.lengths[b] - (T - r1);
    C.lengths = lengths.data();
    C.q = P.q + r0 * P.sq_t;
    C.out = P.out + r0 * P.so_t;
    run_rows(C, isa, nblk, part_buf.data());
  }
}

}  // namespace specedit_cpu
