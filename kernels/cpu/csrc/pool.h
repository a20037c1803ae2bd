// The extension's own worker threads for the parallel loops of decoder.cpp and attention.cpp (pool.cpp).
//
// Why not at::parallel_for (OpenMP) everywhere: libgomp keeps a team per thread that ever ran a parallel region,
// and once their threads outnumber the CPUs (the main thread loaded the model, the server's scheduler thread runs
// the forwards) an idle worker sleeps after ~100 spins instead of ~3 ms, so each of a forward's ~150 regions
// pays futex wake-ups: a decode step off the main thread took twice as long. Off the main thread these loops
// run on workers of our own that spin ~2 ms; on the main thread they stay on libgomp's team (see pool.cpp).
#pragma once
#include <stdint.h>

#include <algorithm>
#include <functional>

namespace specedit_cpu {

// task(i) for every i in [0, n), on up to `threads` threads (the caller included); returns when all are done.
// A nested call, or one made while another thread's call runs, runs its tasks on the calling thread.
void run_tasks(int64_t n, int64_t threads, const std::function<void(int64_t)>& task);

int64_t pool_threads();  // at::get_num_threads() (torch.set_num_threads applies)

// at::parallel_for's split on these threads: up to pool_threads() chunks of ceil(range / chunks), at least
// `grain` each; f(begin, end) on the calling thread alone when there is one chunk.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  const int64_t threads = std::min<int64_t>(pool_threads(), (range + grain - 1) / std::max<int64_t>(1, grain));
  if (threads <= 1) return f(begin, end);
  const int64_t chunk = (range + threads - 1) / threads;
  run_tasks((range + chunk - 1) / chunk, threads,
            [&](int64_t t) { f(begin + t * chunk, std::min(end, begin + (t + 1) * chunk)); });
}

}  // namespace specedit_cpu
