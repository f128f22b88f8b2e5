// A small persistent thread pool: workers spin briefly for the next job (consecutive layer calls of one decode
// step come microseconds apart), then sleep on a condition variable. The calling thread works too.
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace lmp {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
}

class Pool {
public:
    void run(int64_t n, int64_t chunk, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
        std::lock_guard<std::mutex> one_at_a_time(call_mu_);  // calls from several Python threads queue here
        const int helpers = threads - 1;
        grow(helpers);
        fn_ = fn, ctx_ = ctx, n_ = n, chunk_ = chunk, active_ = helpers;
        next_.store(0, std::memory_order_relaxed);
        pending_.store(helpers, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lk(mu_);
            gen_.fetch_add(1, std::memory_order_release);
        }
        cv_.notify_all();
        work();
        for (long spins = 0; pending_.load(std::memory_order_acquire) > 0; ++spins)
            if (spins < 100000) cpu_relax();
            else std::this_thread::yield();
    }

private:
    void grow(int helpers) {
        while (static_cast<int>(workers_.size()) < helpers) {
            const int id = static_cast<int>(workers_.size());
            const uint64_t seen = gen_.load(std::memory_order_acquire);  // before the job this call is about to post
            workers_.emplace_back([this, id, seen] { loop(id, seen); });
            workers_.back().detach();  // the pool lives as long as the process
        }
    }

    void work() {
        for (;;) {
            const int64_t b = next_.fetch_add(chunk_, std::memory_order_relaxed);
            if (b >= n_) return;
            fn_(ctx_, b, b + chunk_ < n_ ? b + chunk_ : n_);
        }
    }

    void loop(int id, uint64_t seen) {
        for (;;) {
            uint64_t g;
            for (int spins = 0; (g = gen_.load(std::memory_order_acquire)) == seen; ++spins) {
                if (spins < 8192) { cpu_relax(); continue; }
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
            }
            seen = g;
            if (id < active_) {
                work();
                pending_.fetch_sub(1, std::memory_order_release);
            }
        }
    }

    std::mutex call_mu_, mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> gen_{0};
    std::atomic<int64_t> next_{0};
    std::atomic<int> pending_{0};
    void (*fn_)(void*, int64_t, int64_t) = nullptr;
    void* ctx_ = nullptr;
    int64_t n_ = 0, chunk_ = 1;
    int active_ = 0;
};

Pool* pool = nullptr;
std::once_flag pool_once;

void fresh_pool_in_child() { pool = new Pool; }  // a forked child has none of the parent's threads

}  // namespace

void parallel_for(int64_t n, int64_t chunk, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
    if (chunk < 1) chunk = 1;
    if (threads <= 1 || n <= chunk) {
        fn(ctx, 0, n);
        return;
    }
    std::call_once(pool_once, [] {
        pool = new Pool;  // never deleted: detached workers may outlive static destructors
        pthread_atfork(nullptr, nullptr, fresh_pool_in_child);
    });
    pool->run(n, chunk, threads, fn, ctx);
}

}  // namespace lmp
