// The persistent worker pool of the engine and run_parallel(), shared by the scan (search.cpp)
// and multi-index hashing (mih.cpp). Pool::get() is an inline function, so its static pool is
// one object for the whole extension.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fasthash {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Persistent workers; run(n, f) calls f on the caller and on up to n - 1 workers. f must claim
// its work from a shared counter (every task is done even if no worker ever shows up): on a
// busy machine a sleeping worker may get the CPU only milliseconds later, so the caller never
// waits for workers that have not started -- it closes the job when its own f returns and
// waits only for workers already inside f. Workers spin briefly (~50 us) before sleeping, so
// back-to-back small searches do not pay a futex wake-up each.
class Pool {
 public:
  static Pool& get() {
    static Pool* p = new Pool();  // leaked on purpose: no join at interpreter exit
    return *p;
  }

  void run(int n, const std::function<void(int)>& f) {
    if (n <= 1) {
      f(0);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mu_);  // one parallel call at a time
    ensure_workers(n - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      active_ = n - 1;
      // gen_ first: a worker that sees open_ == true from this run also sees the new gen_,
      // so a late worker still holding the previous job pointer never runs it
      gen_.fetch_add(1, std::memory_order_seq_cst);
      open_.store(true, std::memory_order_seq_cst);
    }
    cv_.notify_all();
    f(0);
    // Dekker-style hand-off (both sides seq_cst): a worker either registered in running_
    // before this store (and is waited for) or sees the job closed and never touches f.
    open_.store(false, std::memory_order_seq_cst);
    while (running_.load(std::memory_order_seq_cst) != 0) cpu_relax();
  }

 private:
  // Starts workers until there are n. A thread the system cannot create (out of threads or
  // memory) is an error naming num_threads; the workers started so far stay in the pool.
  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      int id = static_cast<int>(workers_.size()) + 1;
      // the generation is read here, before run() publishes the job, so the worker cannot miss it
      const uint64_t start = gen_.load(std::memory_order_acquire);
      try {
        workers_.emplace_back([this, id, start] { loop(id, start); });
      } catch (const std::system_error& e) {
        throw std::runtime_error(
            "num_threads: could not start worker thread " + std::to_string(id + 1) + " of " +
            std::to_string(n + 1) + " (" + e.what() +
            "); the system is out of threads or memory: pass a smaller num_threads");
      }
      workers_.back().detach();
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen) {
        cpu_relax();
        if (++spins % 64 == 0 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(50))
          break;
      }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
      }
      const std::function<void(int)>* job;
      int active;
      {
        // generation, job and worker count are published together under mu_
        std::lock_guard<std::mutex> lk(mu_);
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
        active = active_;
      }
      if (id > active) continue;
      running_.fetch_add(1, std::memory_order_seq_cst);
      if (open_.load(std::memory_order_seq_cst) && gen_.load(std::memory_order_seq_cst) == seen)
        (*job)(id);
      running_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex call_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0;
  std::atomic<uint64_t> gen_{0};
  std::atomic<bool> open_{false};
  std::atomic<int> running_{0};
};

// Calls work(claim) on up to `threads` pool threads; claim() hands out the task ids
// 0 .. ntasks - 1 once each, then -1. The first exception of any worker stops the hand-out and
// is rethrown on the caller (worker threads must not let one escape).
template <class Work>
void run_parallel(int threads, int64_t ntasks, Work work) {
  std::atomic<int64_t> next{0};
  std::mutex err_mu;
  std::string err;
  bool oom = false;
  auto claim = [&]() -> int64_t {
    const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
    return t < ntasks ? t : -1;
  };
  Pool::get().run(threads, [&](int) {
    try {
      work(claim);
    } catch (const std::bad_alloc&) {  // kept as itself: pybind11 maps it to MemoryError
      std::lock_guard<std::mutex> lk(err_mu);
      if (err.empty()) {
        err = "std::bad_alloc";
        oom = true;
      }
      next.store(ntasks);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (err.empty()) err = e.what();
      next.store(ntasks);
    }
  });
  if (oom) throw std::bad_alloc();
  if (!err.empty()) throw std::runtime_error(err);
}

}  // namespace fasthash
