// Worker threads for run_tasks (pool.h).
//
// A call publishes a Job and bumps `gen`; workers spin on `gen` for SPIN, then sleep on it (a futex through
// std::atomic::wait). Tasks are taken from the job's counter by the caller and by up to threads - 1 workers.
// The Job lives on the caller's stack: before returning, the caller unpublishes it and waits until no worker
// is inside (`users`; seq_cst on both sides, so a worker either is counted or sees no job).
#include "pool.h"

#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "simd.h"

namespace specedit_cpu {
namespace {

constexpr auto SPIN = std::chrono::milliseconds(2);  // covers the gaps between a decode loop's forwards

struct Job {
  const std::function<void(int64_t)>* task;
  int64_t n;
  unsigned int csr;                // the caller's MXCSR: every thread rounds (and flushes) as the caller does
  std::atomic<int64_t> slots;      // workers that may still join
  std::atomic<int64_t> next{0}, done{0};
};

void work(Job* j) {
  for (int64_t i; (i = j->next.fetch_add(1, std::memory_order_relaxed)) < j->n;) {
    (*j->task)(i);
    j->done.fetch_add(1, std::memory_order_release);
  }
}

struct Pool {
  std::atomic<uint32_t> gen{0};
  std::atomic<Job*> job{nullptr};
  std::atomic<int64_t> users{0};
  std::atomic<bool> busy{false};
  int64_t workers = 0;  // started (detached; they live as long as the process)
  pid_t pid = getpid();

  void loop(uint32_t seen) {
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      uint32_t g;
      for (int64_t i = 1; (g = gen.load(std::memory_order_acquire)) == seen; ++i) {
        if (i % 256 != 0 || std::chrono::steady_clock::now() - t0 < SPIN)
          spin_pause();
        else
          gen.wait(seen, std::memory_order_acquire);
      }
      seen = g;
      users.fetch_add(1);
      Job* j = job.load();
      if (j != nullptr && j->slots.fetch_sub(1) > 0) {
        MxcsrScope env(j->csr);
        work(j);
      }
      users.fetch_sub(1);
    }
  }
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: detached workers may still be waiting on it at exit
  return *p;
}

}  // namespace

int64_t pool_threads() { return at::get_num_threads(); }

void run_tasks(int64_t n, int64_t threads, const std::function<void(int64_t)>& task) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) task(i);
    return;
  }
  // On the main thread libgomp's team is not throttled (unless other threads run regions too), and after each
  // of torch's own parallel ops its worker spins ~3 ms: workers of ours would fight it for the cores.
  if (syscall(SYS_gettid) == getpid()) {
    at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) task(i);
    });
    return;
  }
  Pool& p = pool();
  if (p.busy.exchange(true, std::memory_order_acquire)) {
    for (int64_t i = 0; i < n; ++i) task(i);
    return;
  }
  if (p.pid != getpid()) {  // a forked child: the parent's workers are not here
    p.workers = 0, p.pid = getpid();
    p.users.store(0);
  }
  for (; p.workers < threads - 1; ++p.workers)
    std::thread([&p, g = p.gen.load()] { p.loop(g); }).detach();
  Job j;
  j.task = &task, j.n = n, j.csr = mxcsr();
  j.slots.store(std::min(threads, n) - 1);
  p.job.store(&j);
  p.gen.fetch_add(1, std::memory_order_release);
  p.gen.notify_all();
  work(&j);
  while (j.done.load(std::memory_order_acquire) < n) spin_pause();
  p.job.store(nullptr);
  while (p.users.load() != 0) spin_pause();
  p.busy.store(false, std::memory_order_release);
}

}  // namespace specedit_cpu
