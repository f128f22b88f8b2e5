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

// Work is handed out in chunks through one atomic word that carries the job's number with the next chunk and
// the chunk count, so a helper can only claim chunks of the job it woke for. The caller waits for the chunks to
// be done, not for the helpers to check in: a helper that the OS has descheduled (another process on the
// cores) never holds the caller up unless it has claimed a chunk, and the caller does the remaining chunks
// itself. On a loaded 2-core machine the old check-in barrier made 2-thread decode 4x slower than 1 thread.
class Pool {
    static constexpr int kIdx = 20;  // bits for the next chunk and for the chunk count
    static constexpr uint64_t kMask = (uint64_t(1) << kIdx) - 1;

public:
    void run(int64_t n, int64_t chunk, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
        int64_t chunks = (n + chunk - 1) / chunk;
        if (chunks > int64_t(kMask)) {  // never in practice; keep the count representable
            chunk = (n + int64_t(kMask) - 1) / int64_t(kMask);
            chunks = (n + chunk - 1) / chunk;
        }
        std::lock_guard<std::mutex> one_at_a_time(call_mu_);  // calls from several Python threads queue here
        const int helpers = threads - 1;
        grow(helpers);
        fn_ = fn, ctx_ = ctx, n_ = n, chunk_ = chunk, active_ = helpers;
        done_.store(0, std::memory_order_relaxed);
        uint64_t g;
        {
            std::lock_guard<std::mutex> lk(mu_);
            g = gen_.load(std::memory_order_relaxed) + 1;  // only this (locked) caller changes gen_
            word_.store(((g & kMask) << (2 * kIdx)) | uint64_t(chunks), std::memory_order_release);
            gen_.store(g, std::memory_order_release);
        }
        cv_.notify_all();
        work(g);
        for (long spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins)
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

    // Claim and run chunks of job g until none is left. Once a claim succeeds, the job cannot finish before that
    // chunk is done, so the job fields read after the claim are its own (even if the 20-bit job number wrapped
    // around, the claimed chunk belongs to the job now posted and is run correctly).
    void work(uint64_t g) {
        uint64_t w = word_.load(std::memory_order_acquire);
        for (;;) {
            if ((w >> (2 * kIdx)) != (g & kMask)) return;  // a later job (or none) is posted
            const uint64_t next = (w >> kIdx) & kMask, total = w & kMask;
            if (next >= total) return;
            if (!word_.compare_exchange_weak(w, w + (uint64_t(1) << kIdx), std::memory_order_acq_rel,
                                             std::memory_order_acquire))
                continue;
            const int64_t b = int64_t(next) * chunk_;
            fn_(ctx_, b, b + chunk_ < n_ ? b + chunk_ : n_);
            done_.fetch_add(1, std::memory_order_release);
            w = word_.load(std::memory_order_acquire);
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
            if (id < active_) work(g);
        }
    }

    std::mutex call_mu_, mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> gen_{0};
    std::atomic<uint64_t> word_{0};  // job number (20 bits) | next chunk (20) | chunk count (20)
    std::atomic<int64_t> done_{0};
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
