// Tests of node::DeviceBackend: one suite, instantiated once per backend.
//
// This file builds into two binaries:
// - dsvm_unit_tests (label unit): the suite on the emulated backend (one and
//   two devices), and on cuda too when the build has it; without a GPU the
//   cuda instances skip with "no GPU: ...". Emulated-only tests follow.
// - dsvm_gpu_tests (tests/gpu/, label gpu; DSVM_DEVICE_TEST_CUDA_ONLY): the
//   suite on cuda only; its main prints "SKIP: no GPU" and exits 0 where no
//   GPU is present.
#include "node/memory/device_backend.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::node {
namespace {

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t r = rng();
    std::memcpy(v.data() + i, &r, std::min<size_t>(8, n - i));
  }
  return v;
}

struct BackendParam {
  std::string label;  // the instance's name in test names
  std::string name;   // MakeDeviceBackend's name
  DeviceBackendOptions options;
};

// Test names and CTest names show the label, not the struct's bytes.
void PrintTo(const BackendParam& p, std::ostream* os) { *os << p.label; }

std::string ParamName(const testing::TestParamInfo<BackendParam>& info) { return info.param.label; }

// A memfd of `bytes` mapped shared here, as a region's store maps its own;
// map is null when something failed.
struct MappedMemfd {
  // `flags`: memfd_create's beyond MFD_CLOEXEC (MFD_HUGETLB: mapping fails,
  // map null, when the machine has too few hugetlb pages reserved).
  explicit MappedMemfd(size_t n, unsigned flags = 0) : bytes(n) {
    fd = memfd_create("device-backend-test", MFD_CLOEXEC | flags);
    void* p = fd >= 0 && ftruncate(fd, static_cast<off_t>(n)) == 0
                  ? mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                  : MAP_FAILED;
    map = p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
  }
  ~MappedMemfd() {
    if (map != nullptr) munmap(map, bytes);
    if (fd >= 0) close(fd);
  }
  MappedMemfd(const MappedMemfd&) = delete;
  MappedMemfd& operator=(const MappedMemfd&) = delete;
  size_t bytes;
  int fd = -1;
  uint8_t* map = nullptr;
};

class DeviceBackendTest : public testing::TestWithParam<BackendParam> {
 protected:
  void SetUp() override {
    auto b = MakeDeviceBackend(GetParam().name, GetParam().options);
    if (!b.ok() && b.status().code() == StatusCode::kUnavailable) {
      GTEST_SKIP() << "no GPU: " << b.status().ToString();
    }
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    backend_ = std::move(b).value();
  }

  DeviceArena Arena(uint64_t bytes, uint32_t device = 0) {
    auto a = backend_->AllocateArena(device, bytes);
    EXPECT_TRUE(a.ok()) << a.status().ToString();
    return a.ok() ? *a : DeviceArena{};
  }
  StagingBuffer Staging(uint64_t bytes) {
    auto s = backend_->AllocateStaging(bytes);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? *s : StagingBuffer{};
  }
  StreamId Stream(uint32_t device = 0) {
    auto s = backend_->CreateStream(device);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? *s : StreamId{};
  }
  // Records a fence on `s` and waits for it.
  void Sync(StreamId s) {
    auto f = backend_->RecordFence(s);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    ASSERT_TRUE(backend_->Wait(*f).ok());
  }
  // The device bytes [p, p + n), read back through a fresh stream.
  std::vector<uint8_t> ReadBack(DevicePtr p, size_t n, uint32_t device = 0) {
    std::vector<uint8_t> out(n, 0xee);
    StreamId s = Stream(device);
    EXPECT_TRUE(backend_->CopyToHost(s, p, out.data(), n).ok());
    Sync(s);
    EXPECT_TRUE(backend_->DestroyStream(s).ok());
    return out;
  }

  std::unique_ptr<DeviceBackend> backend_;
};

TEST_P(DeviceBackendTest, ReportsNameAndDevices) {
  EXPECT_EQ(backend_->name(), GetParam().name);
  EXPECT_GE(backend_->device_count(), 1u);
  EXPECT_EQ(backend_->arena_count(), 0u);
}

TEST_P(DeviceBackendTest, RoundTripsRandomBytesOnEveryDevice) {
  constexpr uint64_t kArena = 4 << 20;
  constexpr size_t kBytes = (1 << 20) + 123;
  constexpr uint64_t kOffset = 4096 + 7;
  const std::vector<uint8_t> data = RandomBytes(kBytes, 1);
  for (uint32_t d = 0; d < backend_->device_count(); ++d) {
    SCOPED_TRACE("device " + std::to_string(d));
    DeviceArena arena = Arena(kArena, d);
    EXPECT_EQ(arena.device, d);
    EXPECT_EQ(arena.bytes, kArena);
    EXPECT_EQ(arena.base % kArenaAlignment, 0u);
    StagingBuffer in = Staging(kBytes);
    StagingBuffer out = Staging(kBytes);
    std::memcpy(in.data, data.data(), kBytes);
    std::vector<uint8_t> pageable(kBytes, 0);
    StreamId s = Stream(d);
    ASSERT_TRUE(backend_->CopyToDevice(s, in.data, arena.base + kOffset, kBytes).ok());
    ASSERT_TRUE(backend_->CopyToHost(s, arena.base + kOffset, out.data, kBytes).ok());
    ASSERT_TRUE(backend_->CopyToHost(s, arena.base + kOffset, pageable.data(), kBytes).ok());
    Sync(s);
    EXPECT_EQ(0, std::memcmp(out.data, data.data(), kBytes));
    EXPECT_EQ(pageable, data);
    // Pageable host memory as the source works too.
    const std::vector<uint8_t> data2 = RandomBytes(kBytes, 2);
    ASSERT_TRUE(backend_->CopyToDevice(s, data2.data(), arena.base, kBytes).ok());
    Sync(s);
    EXPECT_EQ(ReadBack(arena.base, kBytes, d), data2);
    EXPECT_TRUE(backend_->DestroyStream(s).ok());
    EXPECT_TRUE(backend_->FreeStaging(in.data).ok());
    EXPECT_TRUE(backend_->FreeStaging(out.data).ok());
    EXPECT_TRUE(backend_->FreeArena(arena.base).ok());
  }
  EXPECT_EQ(backend_->arena_count(), 0u);
  EXPECT_EQ(backend_->staging_count(), 0u);
  EXPECT_EQ(backend_->stream_count(), 0u);
}

// Each stream alternates "write value i to its cell" and "read the cell into
// out[i]": out[i] == i for every i only if the stream runs its copies in the
// order queued. Two streams run that at once on separate cells.
TEST_P(DeviceBackendTest, CopiesCompleteInOrderPerStream) {
  constexpr int kRounds = 200;
  DeviceArena arena = Arena(1 << 20);
  StagingBuffer values = Staging(2 * kRounds * 8);
  StagingBuffer outs = Staging(2 * kRounds * 8);
  std::memset(outs.data, 0, outs.bytes);
  auto* v = reinterpret_cast<uint64_t*>(values.data);
  auto* o = reinterpret_cast<uint64_t*>(outs.data);
  StreamId streams[2] = {Stream(), Stream()};
  for (int i = 0; i < kRounds; ++i) {
    for (int k = 0; k < 2; ++k) {
      const DevicePtr cell = arena.base + 4096 * k;
      const int at = k * kRounds + i;
      v[at] = (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(i);
      ASSERT_TRUE(backend_->CopyToDevice(streams[k], &v[at], cell, 8).ok());
      ASSERT_TRUE(backend_->CopyToHost(streams[k], cell, &o[at], 8).ok());
    }
  }
  Sync(streams[0]);
  Sync(streams[1]);
  for (int k = 0; k < 2; ++k) {
    for (int i = 0; i < kRounds; ++i) {
      ASSERT_EQ(o[k * kRounds + i], (static_cast<uint64_t>(k) << 32) | static_cast<uint64_t>(i))
          << "stream " << k << " round " << i;
    }
  }
}

TEST_P(DeviceBackendTest, FenceCoversWhatWasQueuedBeforeIt) {
  constexpr size_t kBytes = 256 << 10;
  DeviceArena arena = Arena(4 << 20);
  StagingBuffer in = Staging(kBytes);
  StagingBuffer out = Staging(kBytes);
  const std::vector<uint8_t> data = RandomBytes(kBytes, 3);
  std::memcpy(in.data, data.data(), kBytes);
  StreamId s = Stream();
  ASSERT_TRUE(backend_->CopyToDevice(s, in.data, arena.base, kBytes).ok());
  ASSERT_TRUE(backend_->CopyToHost(s, arena.base, out.data, kBytes).ok());
  auto f1 = backend_->RecordFence(s);
  ASSERT_TRUE(f1.ok());
  EXPECT_EQ(f1->seq, 1u);
  // More work after the fence: the fence does not wait for it.
  for (int i = 1; i < 12; ++i) {
    ASSERT_TRUE(backend_->CopyToDevice(s, in.data, arena.base + i * kBytes, kBytes).ok());
  }
  ASSERT_TRUE(backend_->Wait(*f1).ok());
  auto done = backend_->IsDone(*f1);
  ASSERT_TRUE(done.ok());
  EXPECT_TRUE(*done);
  EXPECT_EQ(0, std::memcmp(out.data, data.data(), kBytes));
  auto f2 = backend_->RecordFence(s);
  ASSERT_TRUE(f2.ok());
  EXPECT_EQ(f2->seq, 2u);
  ASSERT_TRUE(backend_->Wait(*f2).ok());
  EXPECT_TRUE(*backend_->IsDone(*f1));
  EXPECT_TRUE(*backend_->IsDone(*f2));
  // Waiting again on a done fence returns at once.
  EXPECT_TRUE(backend_->Wait(*f1).ok());
  EXPECT_EQ(ReadBack(arena.base + 11 * kBytes, kBytes), data);
}

// A copy between two ranges of the device, in one arena or across two,
// in stream order with the copies around it; bad ranges refused.
TEST_P(DeviceBackendTest, CopiesOnTheDeviceBetweenArenas) {
  constexpr size_t kBytes = 64 << 10;
  DeviceArena a = Arena(1 << 20);
  DeviceArena b = Arena(1 << 20);
  const std::vector<uint8_t> data = RandomBytes(kBytes, 13);
  StreamId s = Stream();
  ASSERT_TRUE(backend_->CopyToDevice(s, data.data(), a.base, kBytes).ok());
  ASSERT_TRUE(backend_->CopyOnDevice(s, a.base, a.base + 4 * kBytes, kBytes).ok());
  ASSERT_TRUE(backend_->CopyOnDevice(s, a.base + 4 * kBytes, b.base + kBytes, kBytes).ok());
  Sync(s);
  EXPECT_EQ(ReadBack(a.base + 4 * kBytes, kBytes), data);
  EXPECT_EQ(ReadBack(b.base + kBytes, kBytes), data);
  const auto kInvalid = StatusCode::kInvalidArgument;
  EXPECT_EQ(backend_->CopyOnDevice(s, a.base, a.base + kBytes / 2, kBytes).code(), kInvalid)
      << "overlapping";
  EXPECT_EQ(backend_->CopyOnDevice(s, a.base, b.base, 0).code(), kInvalid);
  EXPECT_EQ(backend_->CopyOnDevice(s, a.base + (1 << 20) - 4096, b.base, 8192).code(), kInvalid)
      << "past the arena's end";
  EXPECT_EQ(backend_->CopyOnDevice(StreamId{}, a.base, b.base, 4096).code(), kInvalid);
  if (backend_->device_count() > 1) {
    DeviceArena other = Arena(1 << 20, 1);
    EXPECT_EQ(backend_->CopyOnDevice(s, a.base, other.base, 4096).code(), kInvalid)
        << "another device's arena";
    EXPECT_TRUE(backend_->FreeArena(other.base).ok());
  }
  EXPECT_TRUE(backend_->DestroyStream(s).ok());
  EXPECT_TRUE(backend_->FreeArena(a.base).ok());
  EXPECT_TRUE(backend_->FreeArena(b.base).ok());
}

TEST_P(DeviceBackendTest, FencesOnAnIdleStreamAreDone) {
  StreamId s = Stream();
  auto f = backend_->RecordFence(s);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(backend_->Wait(*f).ok());
  EXPECT_TRUE(*backend_->IsDone(*f));
}

// Small pages gathered into one call each way: 256 pages of 4 KiB scattered
// to the arena in reverse order, then gathered back.
TEST_P(DeviceBackendTest, BatchedCopiesScatterAndGather) {
  constexpr int kPages = 256;
  constexpr uint64_t kPage = 4096;
  DeviceArena arena = Arena(kPages * kPage);
  StagingBuffer in = Staging(kPages * kPage);
  StagingBuffer out = Staging(kPages * kPage);
  const std::vector<uint8_t> data = RandomBytes(kPages * kPage, 4);
  std::memcpy(in.data, data.data(), data.size());
  std::vector<HostToDevice> scatter;
  std::vector<DeviceToHost> gather;
  for (int i = 0; i < kPages; ++i) {
    const DevicePtr dev = arena.base + (kPages - 1 - i) * kPage;
    scatter.push_back({in.data + i * kPage, dev, kPage});
    gather.push_back({dev, out.data + i * kPage, kPage});
  }
  StreamId s = Stream();
  ASSERT_TRUE(backend_->CopyToDevice(s, scatter).ok());
  ASSERT_TRUE(backend_->CopyToHost(s, gather).ok());
  Sync(s);
  EXPECT_EQ(0, std::memcmp(out.data, data.data(), data.size()));
  // The device holds the pages reversed.
  const std::vector<uint8_t> dev = ReadBack(arena.base, kPage);
  EXPECT_EQ(0, std::memcmp(dev.data(), data.data() + (kPages - 1) * kPage, kPage));
  // An empty batch does nothing.
  EXPECT_TRUE(backend_->CopyToDevice(s, std::span<const HostToDevice>()).ok());
}

TEST_P(DeviceBackendTest, DestroyStreamWaitsForQueuedCopies) {
  constexpr size_t kBytes = 1 << 20;
  DeviceArena arena = Arena(kBytes);
  const std::vector<uint8_t> data = RandomBytes(kBytes, 5);
  std::vector<uint8_t> out(kBytes, 0);
  StreamId s = Stream();
  ASSERT_TRUE(backend_->CopyToDevice(s, data.data(), arena.base, kBytes).ok());
  ASSERT_TRUE(backend_->CopyToHost(s, arena.base, out.data(), kBytes).ok());
  ASSERT_TRUE(backend_->DestroyStream(s).ok());
  EXPECT_EQ(out, data);
}

TEST_P(DeviceBackendTest, RefusesBadArguments) {
  const auto kInvalid = StatusCode::kInvalidArgument;
  const uint32_t n = backend_->device_count();
  // Devices and sizes.
  EXPECT_EQ(backend_->AllocateArena(n, 1 << 20).status().code(), kInvalid);
  EXPECT_EQ(backend_->AllocateArena(0, 0).status().code(), kInvalid);
  EXPECT_EQ(backend_->AllocateArena(0, 1000).status().code(), kInvalid);
  EXPECT_EQ(backend_->CreateStream(n).status().code(), kInvalid);
  EXPECT_EQ(backend_->AllocateStaging(0).status().code(), kInvalid);

  DeviceArena arena = Arena(1 << 20);
  StagingBuffer buf = Staging(8192);
  StreamId s = Stream();
  // Frees of things that are not there.
  EXPECT_EQ(backend_->FreeArena(arena.base + 4096).code(), kInvalid);
  EXPECT_EQ(backend_->FreeArena(0).code(), kInvalid);
  EXPECT_EQ(backend_->FreeStaging(nullptr).code(), kInvalid);
  EXPECT_EQ(backend_->FreeStaging(buf.data + 1).code(), kInvalid);
  EXPECT_EQ(backend_->DestroyStream(StreamId{s.value + 1000}).code(), kInvalid);
  // Copies.
  std::vector<uint8_t> host(1 << 20);
  EXPECT_EQ(backend_->CopyToDevice(StreamId{}, host.data(), arena.base, 8).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToDevice(s, host.data(), arena.base, 0).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToHost(s, arena.base, host.data(), 0).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToDevice(s, nullptr, arena.base, 8).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToHost(s, arena.base, nullptr, 8).code(), kInvalid);
  // Device ranges: past the end, before the start, in no arena at all.
  EXPECT_EQ(backend_->CopyToDevice(s, host.data(), arena.base + (1 << 20) - 4, 8).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToHost(s, arena.base + (1 << 20), host.data(), 8).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToDevice(s, host.data(), arena.base - 8, 8).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToDevice(s, host.data(), arena.base, (1 << 20) + 1).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToDevice(s, host.data(), 8, 8).code(), kInvalid);
  // A host range that starts in a staging buffer must end in it.
  EXPECT_EQ(backend_->CopyToDevice(s, buf.data + 8000, arena.base, 8192).code(), kInvalid);
  EXPECT_EQ(backend_->CopyToHost(s, arena.base, buf.data + 1, 8192).code(), kInvalid);
  EXPECT_TRUE(backend_->CopyToHost(s, arena.base, buf.data + 1, 8191).ok());
  // A stream copies only to and from its own device's arenas.
  if (n >= 2) {
    StreamId other = Stream(1);
    EXPECT_EQ(backend_->CopyToDevice(other, host.data(), arena.base, 8).code(), kInvalid);
    EXPECT_TRUE(backend_->DestroyStream(other).ok());
  }
  // A batch with one bad entry queues none of it.
  const uint64_t before = 0x1111111111111111ull, after = 0x2222222222222222ull;
  ASSERT_TRUE(backend_->CopyToDevice(s, &before, arena.base, 8).ok());
  Sync(s);
  const HostToDevice batch[] = {{&after, arena.base, 8}, {&after, arena.base + (1 << 20), 8}};
  EXPECT_EQ(backend_->CopyToDevice(s, batch).code(), kInvalid);
  Sync(s);
  uint64_t seen = 0;
  std::memcpy(&seen, ReadBack(arena.base, 8).data(), 8);
  EXPECT_EQ(seen, before);
  // Fences never recorded, on unknown or destroyed streams.
  EXPECT_EQ(backend_->IsDone(Fence{s, 0}).status().code(), kInvalid);
  EXPECT_EQ(backend_->IsDone(Fence{s, 1000}).status().code(), kInvalid);
  EXPECT_EQ(backend_->Wait(Fence{s, 1000}).code(), kInvalid);
  EXPECT_EQ(backend_->RecordFence(StreamId{}).status().code(), kInvalid);
  auto f = backend_->RecordFence(s);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(backend_->DestroyStream(s).ok());
  EXPECT_EQ(backend_->Wait(*f).code(), kInvalid);
  EXPECT_EQ(backend_->DestroyStream(s).code(), kInvalid);
  // Double frees.
  ASSERT_TRUE(backend_->FreeArena(arena.base).ok());
  EXPECT_EQ(backend_->FreeArena(arena.base).code(), kInvalid);
  ASSERT_TRUE(backend_->FreeStaging(buf.data).ok());
  EXPECT_EQ(backend_->FreeStaging(buf.data).code(), kInvalid);
}

// Host memory the caller maps (a memfd, as a region's store is) registered
// for copies: bytes move both ways in place, and the range's rules hold.
TEST_P(DeviceBackendTest, RegisteredHostMemoryCopiesBothWaysInPlace) {
  const auto kInvalid = StatusCode::kInvalidArgument;
  constexpr size_t kBytes = 4 << 20;
  MappedMemfd memfd(kBytes);
  ASSERT_NE(memfd.map, nullptr);
  uint8_t* map = memfd.map;
  const std::vector<uint8_t> data = RandomBytes(kBytes, 9);
  std::memcpy(map, data.data(), kBytes);  // every page present, as registration needs

  ASSERT_TRUE(backend_->RegisterHost(map, kBytes).ok());
  EXPECT_EQ(backend_->registered_count(), 1u);
  EXPECT_EQ(backend_->registered_bytes(), kBytes);
  DeviceArena arena = Arena(kBytes);
  StreamId s = Stream();
  ASSERT_TRUE(backend_->CopyToDevice(s, map + 8192, arena.base, kBytes - 8192).ok());
  Sync(s);
  EXPECT_EQ(ReadBack(arena.base, 4096), std::vector<uint8_t>(data.begin() + 8192, data.begin() + 12288));
  const std::vector<uint8_t> back = RandomBytes(kBytes, 10);
  ASSERT_TRUE(backend_->CopyToDevice(s, back.data(), arena.base, kBytes).ok());
  ASSERT_TRUE(backend_->CopyToHost(s, arena.base, map, kBytes).ok());
  Sync(s);
  EXPECT_EQ(0, std::memcmp(map, back.data(), kBytes));

  // Whole pages only; no overlap with another registration or a staging buffer.
  EXPECT_EQ(backend_->RegisterHost(nullptr, 4096).code(), kInvalid);
  EXPECT_EQ(backend_->RegisterHost(map, 0).code(), kInvalid);
  EXPECT_EQ(backend_->RegisterHost(map + 1, 4096).code(), kInvalid);
  EXPECT_EQ(backend_->RegisterHost(map, 4097).code(), kInvalid);
  EXPECT_EQ(backend_->RegisterHost(map + 4096, 4096).code(), kInvalid);
  StagingBuffer buf = Staging(8192);
  EXPECT_EQ(backend_->RegisterHost(buf.data, 4096).code(), kInvalid);
  // A copy that starts in the range must end in it.
  EXPECT_EQ(backend_->CopyToDevice(s, map + kBytes - 4096, arena.base, 8192).code(), kInvalid);
  EXPECT_EQ(backend_->UnregisterHost(map + 4096).code(), kInvalid);
  ASSERT_TRUE(backend_->UnregisterHost(map).ok());
  EXPECT_EQ(backend_->UnregisterHost(map).code(), kInvalid);
  EXPECT_EQ(backend_->registered_count(), 0u);
  EXPECT_EQ(backend_->registered_bytes(), 0u);
  // Unregistered, the memory is plain pageable memory again.
  ASSERT_TRUE(backend_->CopyToDevice(s, map, arena.base, 4096).ok());
  Sync(s);
  EXPECT_EQ(ReadBack(arena.base, 4096), std::vector<uint8_t>(back.begin(), back.begin() + 4096));
  // A range left registered is unregistered with the backend (ReleaseAll).
  ASSERT_TRUE(backend_->RegisterHost(map + 4096, 8192).ok());
  EXPECT_TRUE(backend_->DestroyStream(s).ok());
  EXPECT_TRUE(backend_->FreeStaging(buf.data).ok());
  EXPECT_TRUE(backend_->FreeArena(arena.base).ok());
  backend_.reset();  // before the memory goes
}

// The GPU tier registers a hugetlb store one 2 MiB page at a time
// (PageStore::MapBlock): each registration copies both ways in place.
// Needs two hugetlb pages reserved; skipped without, unless
// DSVM_REQUIRE_HUGETLB is set (tests/unit/with-hugetlb.sh).
TEST_P(DeviceBackendTest, RegisteredHugetlbPagesCopyBothWaysInPlace) {
  constexpr size_t kHuge = 2 << 20;
  MappedMemfd memfd(2 * kHuge, MFD_HUGETLB | MFD_HUGE_2MB);
  if (memfd.map == nullptr) {
    ASSERT_EQ(std::getenv("DSVM_REQUIRE_HUGETLB"), nullptr) << "no hugetlb pages to map";
    GTEST_SKIP() << "no hugetlb pages reserved (vm.nr_hugepages)";
  }
  const std::vector<uint8_t> data = RandomBytes(2 * kHuge, 11);
  std::memcpy(memfd.map, data.data(), data.size());
  ASSERT_TRUE(backend_->RegisterHost(memfd.map, kHuge).ok());
  ASSERT_TRUE(backend_->RegisterHost(memfd.map + kHuge, kHuge).ok());
  DeviceArena arena = Arena(2 * kHuge);
  StreamId s = Stream();
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(backend_->CopyToDevice(s, memfd.map + i * kHuge, arena.base + i * kHuge, kHuge).ok());
  }
  Sync(s);
  EXPECT_EQ(ReadBack(arena.base + kHuge - 4096, 8192),
            std::vector<uint8_t>(data.begin() + kHuge - 4096, data.begin() + kHuge + 4096));
  const std::vector<uint8_t> back = RandomBytes(2 * kHuge, 12);
  ASSERT_TRUE(backend_->CopyToDevice(s, back.data(), arena.base, back.size()).ok());
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(backend_->CopyToHost(s, arena.base + i * kHuge, memfd.map + i * kHuge, kHuge).ok());
  }
  Sync(s);
  EXPECT_EQ(0, std::memcmp(memfd.map, back.data(), back.size()));
  // A copy may not cross from one registration into the next.
  EXPECT_EQ(backend_->CopyToDevice(s, memfd.map + kHuge - 4096, arena.base, 8192).code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(backend_->UnregisterHost(memfd.map).ok());
  ASSERT_TRUE(backend_->UnregisterHost(memfd.map + kHuge).ok());
  EXPECT_TRUE(backend_->DestroyStream(s).ok());
  EXPECT_TRUE(backend_->FreeArena(arena.base).ok());
}

TEST_P(DeviceBackendTest, ArenaLargerThanTheDeviceIsResourceExhausted) {
  EXPECT_EQ(backend_->AllocateArena(0, uint64_t{1} << 50).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(backend_->arena_count(), 0u);
  EXPECT_EQ(backend_->arena_bytes(0), 0u);
  // The failure leaves the backend usable.
  DeviceArena arena = Arena(1 << 20);
  EXPECT_EQ(backend_->arena_bytes(0), uint64_t{1} << 20);
  EXPECT_EQ(ReadBack(arena.base, 16).size(), 16u);
}

std::vector<BackendParam> Backends() {
  std::vector<BackendParam> v;
#ifndef DSVM_DEVICE_TEST_CUDA_ONLY
  v.push_back({"emulated", "emulated", {}});
  DeviceBackendOptions two;
  two.emulated_devices = 2;
  two.emulated_queue_depth = 4;  // copies wait for room: backpressure on every test
  v.push_back({"emulated_2dev_depth4", "emulated", two});
#endif
#ifdef DSVM_HAVE_CUDA
  v.push_back({"cuda", "cuda", {}});
#endif
  return v;
}

INSTANTIATE_TEST_SUITE_P(Backends, DeviceBackendTest, testing::ValuesIn(Backends()), ParamName);

#ifndef DSVM_DEVICE_TEST_CUDA_ONLY

TEST(DeviceBackendFactoryTest, UnknownNameIsInvalidArgument) {
  EXPECT_EQ(MakeDeviceBackend("opencl").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeDeviceBackend("").status().code(), StatusCode::kInvalidArgument);
}

TEST(DeviceBackendFactoryTest, CudaIsUnavailableWithoutCudaOrGpu) {
  auto b = MakeDeviceBackend("cuda");
  if (!CudaBackendBuilt()) {
    EXPECT_EQ(b.status().code(), StatusCode::kUnavailable);
    EXPECT_NE(b.status().message().find("built without CUDA"), std::string::npos)
        << b.status().message();
  } else if (!b.ok()) {
    EXPECT_EQ(b.status().code(), StatusCode::kUnavailable) << b.status().ToString();
    EXPECT_NE(b.status().message().find("GPU"), std::string::npos) << b.status().message();
  }
}

// The emulated backend copies through the address, so a registered range
// whose pages left it (punched from a memfd) would copy fine here while
// cuda would copy the old pinned pages: it refuses such a copy instead.
TEST(EmulatedDeviceBackendTest, ACopyOfRegisteredPagesThatLeftIsRefused) {
  auto b = MakeDeviceBackend("emulated");
  ASSERT_TRUE(b.ok());
  DeviceBackend& backend = **b;
  constexpr size_t kBytes = 64 << 10;
  MappedMemfd memfd(kBytes);
  ASSERT_NE(memfd.map, nullptr);
  uint8_t* map = memfd.map;
  std::memset(map, 7, kBytes);
  ASSERT_TRUE(backend.RegisterHost(map, kBytes).ok());
  auto arena = backend.AllocateArena(0, kBytes);
  auto stream = backend.CreateStream(0);
  ASSERT_TRUE(arena.ok() && stream.ok());
  EXPECT_TRUE(backend.CopyToDevice(*stream, map, arena->base, kBytes).ok());
  ASSERT_EQ(fallocate(memfd.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 4096), 0);
  EXPECT_EQ(backend.CopyToDevice(*stream, map, arena->base, kBytes).code(), StatusCode::kInternal);
  EXPECT_EQ(backend.CopyToHost(*stream, arena->base, map + 8192, 4096).code(),
            StatusCode::kInternal);
  EXPECT_TRUE(backend.CopyToDevice(*stream, map + 12288, arena->base, 4096).ok())
      << "pages still there copy";
  ASSERT_TRUE(backend.UnregisterHost(map).ok());
  EXPECT_TRUE(backend.CopyToDevice(*stream, map, arena->base, kBytes).ok()) << "plain memory again";
  (*b).reset();  // before the memory goes
}

TEST(EmulatedDeviceBackendTest, CreateRefusesBadOptions) {
  DeviceBackendOptions o;
  o.emulated_devices = 0;
  EXPECT_EQ(MakeDeviceBackend("emulated", o).status().code(), StatusCode::kInvalidArgument);
  o = {};
  o.emulated_device_bytes = 0;
  EXPECT_EQ(MakeDeviceBackend("emulated", o).status().code(), StatusCode::kInvalidArgument);
  o = {};
  o.emulated_queue_depth = 0;
  EXPECT_EQ(MakeDeviceBackend("emulated", o).status().code(), StatusCode::kInvalidArgument);
}

TEST(EmulatedDeviceBackendTest, CapacityRunsOutAndRecovers) {
  DeviceBackendOptions o;
  o.emulated_devices = 2;
  o.emulated_device_bytes = 1 << 20;
  auto b = MakeDeviceBackend("emulated", o);
  ASSERT_TRUE(b.ok());
  auto& backend = **b;
  auto a1 = backend.AllocateArena(0, 512 << 10);
  auto a2 = backend.AllocateArena(0, 512 << 10);
  ASSERT_TRUE(a1.ok() && a2.ok());
  auto a3 = backend.AllocateArena(0, 4096);
  EXPECT_EQ(a3.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(a3.status().message().find("out of memory"), std::string::npos);
  // Each device has its own capacity.
  EXPECT_TRUE(backend.AllocateArena(1, 1 << 20).ok());
  EXPECT_EQ(backend.arena_bytes(0), 1u << 20);
  ASSERT_TRUE(backend.FreeArena(a1->base).ok());
  EXPECT_TRUE(backend.AllocateArena(0, 4096).ok());
  EXPECT_TRUE(backend.AllocateArena(0, 508 << 10).ok());
  EXPECT_EQ(backend.AllocateArena(0, 4096).status().code(), StatusCode::kResourceExhausted);
  // The backend frees what is left at destruction.
}

// An emulated arena is a memfd: another mapping of the exported descriptor
// (a client process's, after dsvm_gpu_map) sees the bytes copied into the
// arena, and writes through it are what the next copy out reads.
TEST(EmulatedDeviceBackendTest, AnExportedArenaSharesItsBytes) {
  auto b = MakeDeviceBackend("emulated", {});
  ASSERT_TRUE(b.ok());
  auto& backend = **b;
  auto arena = backend.AllocateArena(0, 64 << 10);
  ASSERT_TRUE(arena.ok());
  EXPECT_EQ(arena->base % (2u << 20), 0u) << "2 MiB aligned";
  auto e = backend.ExportArena(arena->base);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  ASSERT_GE(e->fd, 0);
  EXPECT_TRUE(e->ipc_handle.empty());
  EXPECT_EQ(backend.ExportArena(arena->base + 4096).status().code(), StatusCode::kInvalidArgument);
  void* view = ::mmap(nullptr, 64 << 10, PROT_READ | PROT_WRITE, MAP_SHARED, e->fd, 0);
  ASSERT_NE(view, MAP_FAILED);
  auto stream = backend.CreateStream(0);
  ASSERT_TRUE(stream.ok());
  std::vector<uint8_t> in(4096, 0x5A), out(4096, 0);
  ASSERT_TRUE(backend.CopyToDevice(*stream, in.data(), arena->base + 8192, 4096).ok());
  auto f = backend.RecordFence(*stream);
  ASSERT_TRUE(f.ok() && backend.Wait(*f).ok());
  EXPECT_EQ(std::memcmp(static_cast<uint8_t*>(view) + 8192, in.data(), 4096), 0);
  std::memset(static_cast<uint8_t*>(view) + 8192, 0xC3, 4096);  // a "kernel" writes
  ASSERT_TRUE(backend.CopyToHost(*stream, arena->base + 8192, out.data(), 4096).ok());
  f = backend.RecordFence(*stream);
  ASSERT_TRUE(f.ok() && backend.Wait(*f).ok());
  EXPECT_EQ(out, std::vector<uint8_t>(4096, 0xC3));
  ::munmap(view, 64 << 10);
}

// The copy-delay test seam holds each copy in flight long enough for a poll
// to see its fence pending; a waiter then sees it done.
TEST(EmulatedDeviceBackendTest, PollSeesACopyInFlight) {
  DeviceBackendOptions o;
  o.emulated_copy_delay = std::chrono::milliseconds(150);
  auto b = MakeDeviceBackend("emulated", o);
  ASSERT_TRUE(b.ok());
  auto& backend = **b;
  auto arena = backend.AllocateArena(0, 8 << 20);
  ASSERT_TRUE(arena.ok());
  auto s = backend.CreateStream(0);
  ASSERT_TRUE(s.ok());
  const std::vector<uint8_t> data = RandomBytes(8 << 20, 6);
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(backend.CopyToDevice(*s, data.data(), arena->base, data.size()).ok());
  auto f = backend.RecordFence(*s);
  ASSERT_TRUE(f.ok());
  auto polled = backend.IsDone(*f);
  ASSERT_TRUE(polled.ok());
  EXPECT_FALSE(*polled) << "the fence is done while its copy should still be in flight";
  // A second stream is not held up by the first one's copy.
  auto s2 = backend.CreateStream(0);
  ASSERT_TRUE(s2.ok());
  auto f2 = backend.RecordFence(*s2);
  ASSERT_TRUE(f2.ok());
  ASSERT_TRUE(backend.Wait(*f2).ok());
  EXPECT_FALSE(*backend.IsDone(*f));
  ASSERT_TRUE(backend.Wait(*f).ok());
  EXPECT_TRUE(*backend.IsDone(*f));
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(150));
}

// FreeArena waits for copies queued against its device, as cudaFree does.
TEST(EmulatedDeviceBackendTest, FreeArenaWaitsForQueuedCopies) {
  DeviceBackendOptions o;
  o.emulated_copy_delay = std::chrono::milliseconds(20);
  auto b = MakeDeviceBackend("emulated", o);
  ASSERT_TRUE(b.ok());
  auto& backend = **b;
  auto arena = backend.AllocateArena(0, 1 << 20);
  auto s = backend.CreateStream(0);
  ASSERT_TRUE(arena.ok() && s.ok());
  const std::vector<uint8_t> data = RandomBytes(1 << 20, 7);
  std::vector<uint8_t> out(1 << 20, 0);
  ASSERT_TRUE(backend.CopyToDevice(*s, data.data(), arena->base, data.size()).ok());
  ASSERT_TRUE(backend.CopyToHost(*s, arena->base, out.data(), out.size()).ok());
  auto f = backend.RecordFence(*s);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE(backend.FreeArena(arena->base).ok());
  EXPECT_EQ(out, data);
  EXPECT_TRUE(*backend.IsDone(*f));
}

#endif  // DSVM_DEVICE_TEST_CUDA_ONLY

}  // namespace
}  // namespace dsvm::node
