// The node daemon's heap settings (node/daemon/heap_tuning.h).
#include "node/daemon/heap_tuning.h"

#include <gtest/gtest.h>
#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace dsvm::node {
namespace {

// Called through volatile pointers, so the compiler keeps every call.
void* (*volatile allocate)(size_t) = ::malloc;
void (*volatile release)(void*) = ::free;

// Whether malloc is glibc's: a sanitizer's allocator (TSan's takes the
// thresholds without complaint) leaves glibc's statistics still.
bool GlibcAllocates() {
  const size_t before = mallinfo2().uordblks;
  void* p = allocate(64u << 10);
  const bool moved = mallinfo2().uordblks != before;
  release(p);
  return moved;
}

TEST(HeapTuningTest, BatchSizedBuffersStayInTheHeapAndAreReused) {
  if (!GlibcAllocates()) GTEST_SKIP() << "malloc is not glibc's here (a sanitizer's)";
  const std::string said = TuneHeap();
  if (said.find("keeps") == std::string::npos) GTEST_SKIP() << said;  // thresholds from the environment
  const size_t batch = 1u << 20;  // a PageBatch at its largest
  const size_t mmapped = mallinfo2().hblks;
  void* a = allocate(batch);
  std::memset(a, 1, batch);
  EXPECT_EQ(mallinfo2().hblks, mmapped) << "a batch-sized buffer got an mmap of its own";
  release(a);
  EXPECT_GE(mallinfo2().fordblks, batch) << "its memory went back to the kernel at once";
  const size_t heap = mallinfo2().arena;
  void* b = allocate(batch);
  EXPECT_EQ(mallinfo2().arena, heap) << "the next buffer did not reuse the freed one";
  release(b);
  // A 2 MiB page's buffer (a stash, a retained page) too.
  void* c = allocate(2u << 20);
  EXPECT_EQ(mallinfo2().hblks, mmapped);
  release(c);
}

TEST(HeapTuningTest, TheEnvironmentsThresholdsWin) {
  const char* had = std::getenv("GLIBC_TUNABLES");
  const std::string saved = had != nullptr ? had : "";
  ASSERT_EQ(setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576", 1), 0);
  EXPECT_EQ(TuneHeap(), "heap thresholds left as the environment sets them");
  if (had != nullptr) {
    setenv("GLIBC_TUNABLES", saved.c_str(), 1);
  } else {
    unsetenv("GLIBC_TUNABLES");
  }
}

TEST(IdleTrimTest, DueOnceAfterASecondWithoutTraffic) {
  IdleTrim t;
  EXPECT_FALSE(t.Due(0, 0));
  EXPECT_FALSE(t.Due(0, 5000)) << "no traffic yet: nothing to give back";
  EXPECT_FALSE(t.Due(4096, 5000));
  EXPECT_FALSE(t.Due(8192, 5500));
  EXPECT_FALSE(t.Due(8192, 5500 + IdleTrim::kIdleMs - 1)) << "quiet for less than kIdleMs";
  EXPECT_TRUE(t.Due(8192, 5500 + IdleTrim::kIdleMs));
  EXPECT_FALSE(t.Due(8192, 9000)) << "once per quiet spell";
  EXPECT_FALSE(t.Due(8193, 9000));
  EXPECT_TRUE(t.Due(8193, 9000 + IdleTrim::kIdleMs)) << "traffic again, then quiet again";
}

}  // namespace
}  // namespace dsvm::node
