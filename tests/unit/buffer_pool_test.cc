// BufferPool: buffers come back for reuse, within the pool's bound.
#include "node/transport/buffer_pool.h"

#include <cstdint>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

namespace dsvm::node {
namespace {

TEST(BufferPoolTest, AGivenBackBufferIsHandedOutAgainForItsSize) {
  auto pool = BufferPool::Create(8u << 20);
  uint8_t* first = nullptr;
  {
    std::shared_ptr<uint8_t> b = pool->Take(2u << 20);
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.get()) % 4096, 0u) << "not aligned to 4 KiB";
    std::memset(b.get(), 0xAB, 2u << 20);  // all of it is ours to write
    first = b.get();
    EXPECT_EQ(pool->kept_bytes(), 0u);
  }
  EXPECT_EQ(pool->kept_bytes(), 2u << 20);
  // Another size does not take it.
  std::shared_ptr<uint8_t> other = pool->Take(1u << 20);
  EXPECT_NE(other.get(), first);
  std::shared_ptr<uint8_t> again = pool->Take(2u << 20);
  EXPECT_EQ(again.get(), first);
  EXPECT_EQ(pool->kept_bytes(), 0u);
  EXPECT_EQ(pool->stats().allocated, 2u);
  EXPECT_EQ(pool->stats().reused, 1u);
}

TEST(BufferPoolTest, KeepsNoMoreThanItsBound) {
  auto pool = BufferPool::Create(5u << 20);
  {
    std::vector<std::shared_ptr<uint8_t>> held;
    for (int i = 0; i < 4; ++i) held.push_back(pool->Take(2u << 20));
  }
  EXPECT_EQ(pool->kept_bytes(), 4u << 20) << "two 2 MiB buffers fit under 5 MiB";
  EXPECT_EQ(pool->stats().freed, 2u);
  auto none = BufferPool::Create(0);
  { auto b = none->Take(4096); }
  EXPECT_EQ(none->kept_bytes(), 0u);
  EXPECT_EQ(none->stats().freed, 1u);
}

// A buffer may be given back after the last other owner of its pool is
// gone (a received page outliving its transport), and on another thread.
TEST(BufferPoolTest, BuffersOutliveTheirPoolsOwnerAndComeBackFromAnyThread) {
  std::shared_ptr<uint8_t> b;
  std::weak_ptr<BufferPool> weak;
  {
    auto pool = BufferPool::Create(4u << 20);
    weak = pool;
    b = pool->Take(64u << 10);
  }
  ASSERT_FALSE(weak.expired()) << "the buffer keeps its pool";
  b.get()[0] = 1;
  std::thread([moved = std::move(b)]() mutable { moved.reset(); }).join();
  EXPECT_TRUE(weak.expired()) << "the pool went with its last buffer";
}

TEST(BufferPoolTest, ZeroBytesGivesAUsableBuffer) {
  auto pool = BufferPool::Create(1u << 20);
  std::shared_ptr<uint8_t> b = pool->Take(0);
  ASSERT_NE(b, nullptr);
  b.get()[0] = 7;
}

}  // namespace
}  // namespace dsvm::node
