// libdsvm's locks and barriers (dsvm.h, "Locks and barriers").
//
// Both are words of region memory changed by atomic instructions. That is
// enough across nodes because the node daemons keep region memory
// sequentially consistent: a page has one writer at a time, every other copy
// is invalidated (hole punched or write-protected in every process of its
// node) before a write proceeds, and a faulting access waits until the page
// is valid. An atomic read-modify-write therefore runs on the only writable
// copy in the cluster and is atomic cluster-wide; within a node the
// processes share the page frame, so the CPU's atomics order them. Data
// written before a release reaches a later acquirer because the acquirer's
// read of that data misses (the page was invalidated when the writer took
// it) and fetches the writer's copy, which was taken after the write.
//
// Waiting rereads the word with plain atomic loads: on a read-only copy they
// cost nothing remote until the holder's write invalidates it. Backoff keeps
// waiters from stealing the page from a holder that is still using it and
// from starving the node daemon of CPU.
#include <dsvm/dsvm.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "client/lib/api_errors.h"
#include "client/lib/open_regions.h"

namespace dsvm::client {
namespace {

constexpr uint64_t kFree = 0;
constexpr uint64_t kMaxParties = uint64_t{1} << 31;
constexpr long kMaxSleepNs = 1'000'000;  // 1 ms

// A lock word names its holder: node id in the high half, thread id in the
// low half. Thread ids are below 2^22 (pid_max) and never 0, node ids never
// 0, so a held word is never kFree.
uint64_t Holder(proto::NodeId node) {
  return (uint64_t{node} << 32) | static_cast<uint32_t>(::syscall(SYS_gettid));
}

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spin, then yield, then sleep with exponential growth up to kMaxSleepNs.
class Backoff {
 public:
  void Wait() {
    ++rounds_;
    if (rounds_ < 64) {
      CpuRelax();
    } else if (rounds_ < 128) {
      ::sched_yield();
    } else {
      timespec ts{0, sleep_ns_};
      ::nanosleep(&ts, nullptr);
      if (sleep_ns_ < kMaxSleepNs) sleep_ns_ = sleep_ns_ * 2 > kMaxSleepNs ? kMaxSleepNs : sleep_ns_ * 2;
    }
  }

 private:
  unsigned rounds_ = 0;
  long sleep_ns_ = 2000;
};

// Checks an object of `size` bytes at `p`: aligned and inside a region open
// in this process. On success *node is this process's node.
int CheckObject(const std::string& what, const void* p, size_t size, proto::NodeId* node) {
  if (p == nullptr) return Fail(DSVM_EINVALID_ARGUMENT, what + ": NULL");
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a % 8 != 0) return Fail(DSVM_EINVALID_ARGUMENT, what + ": " + Hex(a) + " is not 8-byte aligned");
  OpenRange range;
  if (int rc = FindOpenRange(what, a, size, &range); rc != DSVM_OK) return rc;
  *node = range.node;
  return DSVM_OK;
}

std::string Described(const char* fn, const void* p) {
  return std::string(fn) + "(" + Hex(reinterpret_cast<uintptr_t>(p)) + ")";
}

int LockInit(dsvm_lock_t* lock) {
  const std::string what = Described("dsvm_lock_init", lock);
  proto::NodeId node;
  if (int rc = CheckObject(what, lock, sizeof(*lock), &node); rc != DSVM_OK) return rc;
  __atomic_store_n(&lock->word, kFree, __ATOMIC_SEQ_CST);
  return Succeed();
}

// Tries once; `self` is the caller's holder word.
int TryOnce(dsvm_lock_t* lock, uint64_t self, const std::string& what) {
  uint64_t seen = __atomic_load_n(&lock->word, __ATOMIC_RELAXED);
  if (seen == self) {
    return Fail(DSVM_EFAILED_PRECONDITION, what + ": the calling thread holds it already");
  }
  if (seen != kFree) return DSVM_EBUSY;
  uint64_t expected = kFree;
  if (__atomic_compare_exchange_n(&lock->word, &expected, self, false, __ATOMIC_SEQ_CST,
                                  __ATOMIC_RELAXED)) {
    return Succeed();
  }
  return DSVM_EBUSY;
}

int LockAcquire(dsvm_lock_t* lock) {
  const std::string what = Described("dsvm_lock_acquire", lock);
  proto::NodeId node;
  if (int rc = CheckObject(what, lock, sizeof(*lock), &node); rc != DSVM_OK) return rc;
  const uint64_t self = Holder(node);
  Backoff backoff;
  for (;;) {
    const int rc = TryOnce(lock, self, what);
    if (rc != DSVM_EBUSY) return rc;
    backoff.Wait();
  }
}

int LockTryAcquire(dsvm_lock_t* lock) {
  const std::string what = Described("dsvm_lock_try_acquire", lock);
  proto::NodeId node;
  if (int rc = CheckObject(what, lock, sizeof(*lock), &node); rc != DSVM_OK) return rc;
  const int rc = TryOnce(lock, Holder(node), what);
  if (rc == DSVM_EBUSY) return Fail(DSVM_EBUSY, what + ": another thread holds it");
  return rc;
}

int LockRelease(dsvm_lock_t* lock) {
  const std::string what = Described("dsvm_lock_release", lock);
  proto::NodeId node;
  if (int rc = CheckObject(what, lock, sizeof(*lock), &node); rc != DSVM_OK) return rc;
  uint64_t expected = Holder(node);
  if (!__atomic_compare_exchange_n(&lock->word, &expected, kFree, false, __ATOMIC_SEQ_CST,
                                   __ATOMIC_RELAXED)) {
    if (expected == kFree) return Fail(DSVM_EFAILED_PRECONDITION, what + ": the lock is free");
    return Fail(DSVM_EFAILED_PRECONDITION,
                what + ": held by thread " + std::to_string(expected & 0xffffffffu) +
                    " on node " + std::to_string(expected >> 32) + ", not the calling thread");
  }
  return Succeed();
}

int BarrierInit(dsvm_barrier_t* barrier, uint32_t parties) {
  const std::string what = Described("dsvm_barrier_init", barrier);
  proto::NodeId node;
  if (int rc = CheckObject(what, barrier, sizeof(*barrier), &node); rc != DSVM_OK) return rc;
  if (parties == 0 || parties > kMaxParties) {
    return Fail(DSVM_EINVALID_ARGUMENT, what + ": " + std::to_string(parties) +
                                            " parties; allowed are 1 .. 2^31");
  }
  __atomic_store_n(&barrier->parties, uint64_t{parties}, __ATOMIC_SEQ_CST);
  __atomic_store_n(&barrier->word, uint64_t{0}, __ATOMIC_SEQ_CST);
  return Succeed();
}

int BarrierWait(dsvm_barrier_t* barrier) {
  const std::string what = Described("dsvm_barrier_wait", barrier);
  proto::NodeId node;
  if (int rc = CheckObject(what, barrier, sizeof(*barrier), &node); rc != DSVM_OK) return rc;
  const uint64_t parties = __atomic_load_n(&barrier->parties, __ATOMIC_SEQ_CST);
  if (parties == 0 || parties > kMaxParties) {
    return Fail(DSVM_EFAILED_PRECONDITION,
                what + ": not initialised (parties " + std::to_string(parties) + ")");
  }
  // Arrive: count up, or as the last party reset the count and start the
  // next generation, in one atomic step on the word.
  uint64_t seen = __atomic_load_n(&barrier->word, __ATOMIC_SEQ_CST);
  uint64_t next;
  bool last;
  do {
    const uint64_t arrived = seen & 0xffffffffu;
    if (arrived >= parties) {
      return Fail(DSVM_EFAILED_PRECONDITION, what + ": its word says " + std::to_string(arrived) +
                                                 " arrived of " + std::to_string(parties) +
                                                 " parties; the barrier is corrupt");
    }
    last = arrived + 1 == parties;
    next = last ? ((seen >> 32) + 1) << 32 : seen + 1;
  } while (!__atomic_compare_exchange_n(&barrier->word, &seen, next, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST));
  if (last) {
    Succeed();
    return DSVM_BARRIER_LAST;
  }
  const uint64_t generation = seen >> 32;
  Backoff backoff;
  while ((__atomic_load_n(&barrier->word, __ATOMIC_SEQ_CST) >> 32) == generation) backoff.Wait();
  return Succeed();
}

}  // namespace
}  // namespace dsvm::client

using dsvm::client::Guarded;

extern "C" {

int dsvm_lock_init(dsvm_lock_t* lock) {
  return Guarded("dsvm_lock_init", [&] { return dsvm::client::LockInit(lock); });
}

int dsvm_lock_acquire(dsvm_lock_t* lock) {
  return Guarded("dsvm_lock_acquire", [&] { return dsvm::client::LockAcquire(lock); });
}

int dsvm_lock_try_acquire(dsvm_lock_t* lock) {
  return Guarded("dsvm_lock_try_acquire", [&] { return dsvm::client::LockTryAcquire(lock); });
}

int dsvm_lock_release(dsvm_lock_t* lock) {
  return Guarded("dsvm_lock_release", [&] { return dsvm::client::LockRelease(lock); });
}

int dsvm_barrier_init(dsvm_barrier_t* barrier, uint32_t parties) {
  return Guarded("dsvm_barrier_init",
                 [&] { return dsvm::client::BarrierInit(barrier, parties); });
}

int dsvm_barrier_wait(dsvm_barrier_t* barrier) {
  return Guarded("dsvm_barrier_wait", [&] { return dsvm::client::BarrierWait(barrier); });
}

}  // extern "C"
