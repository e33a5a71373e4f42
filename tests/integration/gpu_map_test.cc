// dsvm_gpu_map / dsvm_gpu_unmap end to end (issue #5): a real coordinator
// process, node daemons with the `emulated` device backend on threads of
// this process (as in dsvm-node), and client processes forked from it that
// use libdsvm. The emulated backend is the designated device seam: its
// arenas are memfds that libdsvm maps, so a client reads and writes "device
// memory" through the device pointer as a kernel would.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <dsvm/dsvm.h>
#include <gtest/gtest.h>

#include "node/daemon/node_daemon.h"
#include "tests/integration/coordinator_process.h"
#include "tests/integration/running_daemon.h"

namespace dsvm::testing {
namespace {

using node::NodeDaemon;

constexpr uint32_t kPage = 4096;
constexpr uint64_t kBudgetPages = 16;  // each emulated GPU's budget

// The value a test stores in word `w` of page `page` in round `round`.
uint64_t Pattern(uint64_t page, uint64_t w, uint64_t round) {
  return (page << 32) ^ (w * 0x9E3779B97F4A7C15ull) ^ (round << 56);
}

class GpuMapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetQuietForkDaemons(&nodes_);
    ::setenv("UCX_TLS", "tcp", 1);
    ::setenv("UCX_NET_DEVICES", "lo", 1);
    ASSERT_TRUE(coord_.Start(dir_.path() + "/data", TestCoordinatorFlags(coordinator_flags_)).ok())
        << coord_.stderr_text();
    auto tool = ConnectTool(coord_.address());
    ASSERT_TRUE(tool.ok());
    tool_ = std::move(*tool);
  }
  void TearDown() override {
    for (int fd : {held_ready_[0], held_ready_[1], held_go_[0], held_go_[1]}) {
      if (fd >= 0) ::close(fd);
    }
    nodes_.clear();
    SetQuietForkDaemons(nullptr);
  }

  proto::RegionReply Region(const std::string& name, uint64_t pages) {
    auto reply = tool_.Call(proto::RegionCreate{
        .name = name, .size = pages * kPage, .page_size = kPage, .mode = 0666});
    EXPECT_TRUE(reply.ok());
    auto* r = reply.ok() ? std::get_if<proto::RegionReply>(&*reply) : nullptr;
    EXPECT_NE(r, nullptr);
    return r ? *r : proto::RegionReply{};
  }

  node::NodeDaemonOptions Options(int i, const std::string& backend = "emulated") {
    node::NodeDaemonOptions o = TestNodeOptions(coord_.address());
    o.socket_path = Socket(i);
    o.device_backend = backend;
    o.map_for_copies = map_for_copies_;
    if (backend != "none") {
      o.gpu_budget_bytes = budget_pages_ * kPage;
      // Arenas of an eighth of the budget: regions share it (each region's
      // pool holds whole arenas), and runs larger than an arena get their own.
      o.gpu_arena_bytes = budget_pages_ / 8 * kPage;
    }
    return o;
  }
  std::string Socket(int i) const { return dir_.path() + "/node" + std::to_string(i) + ".sock"; }
  // NodeDaemonOptions::map_for_copies of the daemons Options() makes.
  bool map_for_copies_ = true;

  // Starts daemons with `backends` and opens `region` on each; node 0 with
  // `host_budget` bytes of host budget (0: none).
  void StartNodes(const std::vector<std::string>& backends, const proto::RegionReply& region,
                  uint64_t host_budget = 0) {
    for (size_t i = 0; i < backends.size(); ++i) {
      node::NodeDaemonOptions o = Options(static_cast<int>(i), backends[i]);
      if (i == 0) o.host_budget_bytes = host_budget;
      auto d = NodeDaemon::Create(o);
      ASSERT_TRUE(d.ok()) << d.status().ToString();
      nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
      nodes_.back()->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(region).ok()); });
    }
  }

  // A region `name` of `pages` 64 KiB pages (*r); node 0 with an emulated
  // GPU of `budget_pages` whose copies each wait `delay` (one copy
  // thread), node 1 with none; then a client on node 0 writes
  // Pattern(p, 0, 1) into the first `written` pages, so node 0 holds them.
  void StartSlowGpuNodeAndPlainNode(const std::string& name, uint64_t pages, uint64_t budget_pages,
                                    std::chrono::milliseconds delay, uint64_t written,
                                    proto::RegionReply* r) {
    constexpr uint32_t kBig = 64u << 10;
    auto reply = tool_.Call(proto::RegionCreate{
        .name = name, .size = pages * kBig, .page_size = kBig, .mode = 0666});
    ASSERT_TRUE(reply.ok());
    ASSERT_TRUE(std::holds_alternative<proto::RegionReply>(*reply));
    *r = std::get<proto::RegionReply>(*reply);
    node::NodeDaemonOptions o = Options(0);
    o.gpu_budget_bytes = budget_pages * kBig;
    o.gpu_copy_threads = 1;
    o.emulated_copy_delay = delay;
    for (node::NodeDaemonOptions opts : {o, Options(1, "none")}) {
      auto d = NodeDaemon::Create(opts);
      ASSERT_TRUE(d.ok()) << d.status().ToString();
      nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
      nodes_.back()->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(*r).ok()); });
    }
    ASSERT_EQ(RunClient(0, name, [&](uint8_t* base) {
                for (uint64_t p = 0; p < written; ++p) {
                  *reinterpret_cast<uint64_t*>(base + p * kBig) = Pattern(p, 0, 1);
                }
                return 0;
              }),
              0);
  }

  // A client process on node `node`: dsvm_init, dsvm_region_open(name),
  // then `body(region address)`; returns its exit code (body's, or 100+ for
  // setup failures, 200 when it died).
  int RunClient(int node, const std::string& name, const std::function<int(uint8_t*)>& body) {
    const pid_t pid = QuietFork();
    if (pid == 0) ::_exit(ClientMain(node, name, body));
    int status = 0;
    ::waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 200;
  }
  int ClientMain(int node, const std::string& name, const std::function<int(uint8_t*)>& body) {
    void* addr = nullptr;
    if (dsvm_init(Socket(node).c_str()) != DSVM_OK) {
      std::fprintf(stderr, "client: %s\n", dsvm_last_error());
      return 100;
    }
    if (dsvm_region_open(name.c_str(), &addr, nullptr) != DSVM_OK) {
      std::fprintf(stderr, "client: %s\n", dsvm_last_error());
      return 101;
    }
    const int rc = body(static_cast<uint8_t*>(addr));
    if (rc != 0) std::fprintf(stderr, "client: step %d failed; last error: %s\n", rc, dsvm_last_error());
    dsvm_finalize();
    return rc;
  }

  // Waits (20 s at most) until `done` holds on node i's loop.
  bool WaitFor(int i, const std::function<bool(NodeDaemon&)>& done) {
    for (int tries = 0; tries < 2000; ++tries) {
      bool ok = false;
      nodes_[i]->Sync([&](NodeDaemon& d) { ok = done(d); });
      if (ok) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  // A process of node 0 holding a write map of region `name`'s first page:
  // it writes kHeldFirst through the device pointer, and once
  // ReleaseWriteMap() says so, kHeldLast (the last write before the unmap)
  // and unmaps. Returns its pid once the first write is done.
  static constexpr uint64_t kHeldFirst = 0x600DF00D, kHeldLast = 0xFEEDBEEF;
  pid_t HoldWriteMap(const std::string& name) {
    EXPECT_EQ(::pipe(held_ready_), 0);
    EXPECT_EQ(::pipe(held_go_), 0);
    const pid_t pid = QuietFork();
    if (pid == 0) {
      ::_exit(ClientMain(0, name, [&](uint8_t* base) {
        void* dev = nullptr;
        if (dsvm_gpu_map(base, kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
        *static_cast<uint64_t*>(dev) = kHeldFirst;
        char c = 1;
        if (::write(held_ready_[1], &c, 1) != 1 || ::read(held_go_[0], &c, 1) != 1) return 2;
        *static_cast<uint64_t*>(dev) = kHeldLast;
        return dsvm_gpu_unmap(base, kPage) == DSVM_OK ? 0 : 3;
      }));
    }
    char c;
    EXPECT_EQ(::read(held_ready_[0], &c, 1), 1);
    return pid;
  }
  void ReleaseWriteMap() {
    char c = 1;
    EXPECT_EQ(::write(held_go_[1], &c, 1), 1);
  }
  int held_ready_[2] = {-1, -1};
  int held_go_[2] = {-1, -1};

  std::vector<std::string> coordinator_flags_;  // set before SetUp
  uint64_t budget_pages_ = kBudgetPages;        // each GPU's, for the nodes started next
  TempDir dir_;
  CoordinatorProcess coord_;
  proto::FramedSocket tool_;
  std::vector<std::unique_ptr<RunningDaemon>> nodes_;
};

// A process writes through the device pointer of a write map and unmaps:
// the bytes stay dirty in (emulated) HBM, and another node that reads them
// gets them: the daemon writes them back when asked.
TEST_F(GpuMapTest, AWriteMapIsSeenByAnotherNodeAfterUnmap) {
  const proto::RegionReply r = Region("gw", 32);
  StartNodes({"emulated", "emulated"}, r);
  constexpr uint64_t kFirst = 4, kPages = 8;
  EXPECT_EQ(RunClient(0, "gw", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base + kFirst * kPage, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              if (dev == nullptr || dev == base + kFirst * kPage) return 2;  // device memory, not the region
              auto* words = static_cast<uint64_t*>(dev);
              for (uint64_t p = 0; p < kPages; ++p) {
                for (uint64_t w = 0; w < kPage / 8; ++w) words[p * kPage / 8 + w] = Pattern(kFirst + p, w, 1);
              }
              return dsvm_gpu_unmap(base + kFirst * kPage, kPages * kPage) == DSVM_OK ? 0 : 3;
            }),
            0);
  // Unmapped, still dirty on the GPU: nothing was written back yet.
  nodes_[0]->Sync([&](NodeDaemon& d) {
    ASSERT_NE(d.tier(), nullptr);
    EXPECT_EQ(d.gpu_mapped_pages(), 0u);
    for (uint64_t p = 0; p < kPages; ++p) {
      EXPECT_TRUE(d.tier()->table().IsDirty(r.base + (kFirst + p) * kPage)) << "page " << p;
    }
    EXPECT_EQ(d.tier()->stats().pages_to_host, 0u);
    EXPECT_EQ(d.stats().gpu_maps, 1u);
  });
  for (uint64_t p = 0; p < kPages; ++p) {
    ASSERT_TRUE(nodes_[1]->Access(r.base + (kFirst + p) * kPage, false, [&](std::span<uint8_t> b) {
                   const auto* words = reinterpret_cast<const uint64_t*>(b.data());
                   for (uint64_t w = 0; w < kPage / 8; ++w) {
                     ASSERT_EQ(words[w], Pattern(kFirst + p, w, 1)) << "page " << p << " word " << w;
                   }
                 }).ok());
  }
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_host, kPages) << "written back when node 1 asked";
  });
}

// The region goes while a process still has a GPU map of it (the region
// deleted, then closed by the process): the map is lost, not freed under
// it. Its slots stay held, nothing of the new state counts the map's pins,
// and the unmap says DSVM_EDATA_LOSS. Fails without: the region's removal
// freed the pinned slots and left its pins behind.
TEST_F(GpuMapTest, ARegionDeletedUnderAGpuMapLosesTheMap) {
  const proto::RegionReply r = Region("gdel", 16);
  StartNodes({"emulated"}, r);
  constexpr uint64_t kPages = 8;
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = QuietFork();
  if (pid == 0) {
    char c = 0;
    ::_exit(ClientMain(0, "gdel", [&](uint8_t* base) {
      void* dev = nullptr;
      if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
      std::memset(dev, 0x5a, kPages * kPage);
      if (::write(ready[1], "r", 1) != 1 || ::read(go[0], &c, 1) != 1) return 2;
      if (dsvm_region_close(base) != DSVM_OK) return 3;
      if (::write(ready[1], "c", 1) != 1 || ::read(go[0], &c, 1) != 1) return 4;
      return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_EDATA_LOSS ? 0 : 5;
    }));
  }
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  auto del = tool_.Call(proto::RegionDelete{.name = "gdel"});
  ASSERT_TRUE(del.ok());
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  EXPECT_TRUE(WaitFor(0, [](NodeDaemon& d) { return d.stats().regions_deleted == 1; }));
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.gpu_mapped_pages(), 0u);
    EXPECT_EQ(d.stats().gpu_maps_lost, 1u);
    // The region's pool outlives it, holding the lost map's slots (a run
    // larger than an arena: an arena of its own, of its size).
    EXPECT_EQ(d.tier()->pool_count(), 1u);
    EXPECT_EQ(d.tier()->arena_bytes(0), kPages * kPage) << "the lost map keeps its slots";
  });
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->pool_count(), 0u) << "freed by the unmap, and the pool with them";
    EXPECT_EQ(d.tier()->arena_bytes(0), 0u);
  });
  for (int fd : {ready[0], ready[1], go[0], go[1]}) ::close(fd);
}

// GPU memory is never shared between regions: a map's arena (what its
// client can reach through the exported memfd or IPC handle) holds pages of
// its own region only. Region B's pages sit on the GPU (mapped, unmapped,
// cached there) when region A is mapped; no word of A's arenas is one of
// B's. Fails without per-region pools: A's run went into the arena that
// held B's cached pages, and A's client could read them.
TEST_F(GpuMapTest, AMapsArenaHoldsNoOtherRegionsPages) {
  const proto::RegionReply a = Region("giso-a", 16);
  const proto::RegionReply b = Region("giso-b", 16);
  StartNodes({"emulated"}, a);
  nodes_[0]->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(b).ok()); });
  constexpr uint64_t kPages = 8;
  constexpr uint64_t kSecret = 0x5ec2e75ec2e75ec2ull;
  EXPECT_EQ(RunClient(0, "giso-b", [&](uint8_t* base) {
              auto* words = reinterpret_cast<volatile uint64_t*>(base);
              for (uint64_t w = 0; w < kPages * kPage / 8; ++w) words[w] = kSecret;
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              if (static_cast<const uint64_t*>(dev)[5] != kSecret) return 2;
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK ? 0 : 3;
            }),
            0);
  EXPECT_EQ(RunClient(0, "giso-a", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK ? 0 : 2;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    // (The emulated GPU's memory is this process's: arenas are read in place.)
    auto secrets_in = [](const node::DevicePagePool* pool) {
      uint64_t found = 0;
      for (const node::DeviceArena& arena : pool->arenas()) {
        const auto* w = reinterpret_cast<const uint64_t*>(arena.base);
        for (uint64_t i = 0; i < arena.bytes / 8; ++i) found += w[i] == kSecret;
      }
      return found;
    };
    ASSERT_NE(d.tier()->PoolOf(0, a.base), nullptr);
    ASSERT_NE(d.tier()->PoolOf(0, b.base), nullptr);
    for (uint64_t p = 0; p < kPages; ++p) {
      ASSERT_EQ(d.tier()->table().GpuOf(b.base + p * kPage), std::optional<uint32_t>(0))
          << "B's page " << p << " is on the GPU";
    }
    EXPECT_EQ(secrets_in(d.tier()->PoolOf(0, b.base)), kPages * kPage / 8);
    EXPECT_EQ(secrets_in(d.tier()->PoolOf(0, a.base)), 0u) << "A's arenas hold B's bytes";
  });
}

// A zero-copy map (accessed-by: the GPU uses the host copy) and a map into
// GPU memory of the same pages would each lose the other's writes: each
// waits for the other's unmap. Two GPUs: the advice names GPU 0, so maps
// on GPU 1 go through GPU memory.
TEST_F(GpuMapTest, ZeroCopyAndGpuMemoryMapsOfOnePageExcludeEachOther) {
  const proto::RegionReply r = Region("gzx", 8);
  node::NodeDaemonOptions o = Options(0);
  o.emulated_gpus = 2;
  auto d = NodeDaemon::Create(o);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
  nodes_[0]->Sync([&](NodeDaemon& n) { ASSERT_TRUE(n.OpenRegion(r).ok()); });
  constexpr uint64_t kLen = 4 * kPage;
  EXPECT_EQ(RunClient(0, "gzx", [&](uint8_t* base) {
              if (dsvm_advise(base, kLen, DSVM_ADVICE_ACCESSED_BY, 0) != DSVM_OK) return 1;
              void* zc = nullptr;
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kLen, 0, DSVM_GPU_WRITE, &zc) != DSVM_OK || zc != base) return 2;
              if (dsvm_gpu_map(base, kLen, 1, DSVM_GPU_READ, &dev) != DSVM_EFAILED_PRECONDITION) return 3;
              if (dsvm_gpu_unmap(base, kLen) != DSVM_OK) return 4;
              if (dsvm_gpu_map(base, kLen, 1, DSVM_GPU_READ, &dev) != DSVM_OK || dev == base) return 5;
              if (dsvm_gpu_map(base, kLen, 0, DSVM_GPU_READ, &zc) != DSVM_EFAILED_PRECONDITION) return 6;
              return dsvm_gpu_unmap(base, kLen) == DSVM_OK ? 0 : 7;
            }),
            0);
}

// The daemon gives an empty arena back when another page size needs the
// budget, and a later arena may get the same device address. A client that
// mapped the old one must not take the new one for it: its writes would go
// to freed memory. Here: 16 pages of 4 KiB fill the 64 KiB budget; one
// 64 KiB page takes their arena; the 4 KiB pages come back in a new one,
// and what the client writes through the third map reaches another node.
TEST_F(GpuMapTest, AnArenaGivenBackAndTakenAgainIsMappedAfresh) {
  const proto::RegionReply small = Region("garena4k", kBudgetPages);
  auto big = tool_.Call(proto::RegionCreate{
      .name = "garena64k", .size = 64 << 10, .page_size = 64 << 10, .mode = 0666});
  ASSERT_TRUE(big.ok());
  const proto::RegionReply large = std::get<proto::RegionReply>(*big);
  StartNodes({"emulated", "emulated"}, small);
  for (auto& n : nodes_) n->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(large).ok()); });
  const uint64_t len = kBudgetPages * kPage;
  auto write_all = [&](void* dev, uint64_t pages, uint64_t page_bytes, uint64_t round) {
    auto* words = static_cast<uint64_t*>(dev);
    for (uint64_t p = 0; p < pages; ++p) {
      for (uint64_t w = 0; w < page_bytes / 8; ++w) words[p * page_bytes / 8 + w] = Pattern(p, w, round);
    }
  };
  EXPECT_EQ(RunClient(0, "garena4k", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, len, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              write_all(dev, kBudgetPages, kPage, 1);
              if (dsvm_gpu_unmap(base, len) != DSVM_OK) return 2;
              void* big_base = nullptr;
              if (dsvm_region_open("garena64k", &big_base, nullptr) != DSVM_OK) return 3;
              if (dsvm_gpu_map(big_base, 64 << 10, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 4;
              write_all(dev, 1, 64 << 10, 2);
              if (dsvm_gpu_unmap(big_base, 64 << 10) != DSVM_OK) return 5;
              if (dsvm_gpu_map(base, len, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 6;
              write_all(dev, kBudgetPages, kPage, 3);
              return dsvm_gpu_unmap(base, len) == DSVM_OK ? 0 : 7;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_GE(d.tier()->stats().arenas_reclaimed, 2u) << "each size took the other's arena";
  });
  for (uint64_t p = 0; p < kBudgetPages; ++p) {
    ASSERT_TRUE(nodes_[1]->Access(small.base + p * kPage, false, [&](std::span<uint8_t> b) {
                   const auto* words = reinterpret_cast<const uint64_t*>(b.data());
                   for (uint64_t w = 0; w < kPage / 8; ++w) {
                     ASSERT_EQ(words[w], Pattern(p, w, 3)) << "page " << p << " word " << w;
                   }
                 }).ok());
  }
}

// A read map sees what another node wrote; after that node writes again,
// the GPU copy is gone with the page and the next map sees the new bytes.
// Round 2 takes node 0's copy by an Invalidate (node 2 is the sharer that
// stashes for the upgrade), round 3 by a Fetch that stashes it (node 0 is
// the only other sharer): both coherence paths must drop the GPU copy.
// The node's own processes see what the GPU wrote: pages of a write map are
// taken from local processes' page tables while mapped and after, until a
// local access writes the GPU's copy back. The client read the pages on the
// CPU before the map (so it had them mapped), and reads them again after the
// unmap; then another process of the node reads them. Fails without the
// hiding: the CPU kept reading its host copy.
TEST_F(GpuMapTest, AWriteMapIsSeenByItsOwnNodesProcesses) {
  const proto::RegionReply r = Region("gself", 16);
  StartNodes({"emulated"}, r);
  constexpr uint64_t kFirst = 2, kPages = 4;
  EXPECT_EQ(RunClient(0, "gself", [&](uint8_t* base) {
              auto* cpu = reinterpret_cast<volatile uint64_t*>(base + kFirst * kPage);
              for (uint64_t p = 0; p < kPages; ++p) cpu[p * kPage / 8] = 7;  // mapped, writable
              void* dev = nullptr;
              if (dsvm_gpu_map(base + kFirst * kPage, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              auto* words = static_cast<uint64_t*>(dev);
              for (uint64_t p = 0; p < kPages; ++p) {
                for (uint64_t w = 0; w < kPage / 8; ++w) words[p * kPage / 8 + w] = Pattern(kFirst + p, w, 2);
              }
              if (dsvm_gpu_unmap(base + kFirst * kPage, kPages * kPage) != DSVM_OK) return 3;
              for (uint64_t p = 0; p < kPages; ++p) {
                for (uint64_t w = 0; w < kPage / 8; w += 61) {
                  if (cpu[p * kPage / 8 + w] != Pattern(kFirst + p, w, 2)) {
                    std::fprintf(stderr, "page %lu word %lu: the CPU sees %#lx\n", p, w,
                                 static_cast<unsigned long>(cpu[p * kPage / 8 + w]));
                    return 4;
                  }
                }
              }
              return 0;
            }),
            0);
  EXPECT_EQ(RunClient(0, "gself", [&](uint8_t* base) {
              const auto* cpu = reinterpret_cast<const volatile uint64_t*>(base + kFirst * kPage);
              for (uint64_t p = 0; p < kPages; ++p) {
                if (cpu[p * kPage / 8 + 1] != Pattern(kFirst + p, 1, 2)) return 5;
              }
              return 0;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_host, kPages) << "written back once, on the CPU's touch";
  });
}

// As above, for a map of more pages than a region's store would once set
// aside (1024): every page leaves local page tables while the GPU may write
// it, however many. Before f50d5ea the pages past the 1024th stayed mapped,
// so the CPU kept reading its stale copy after the unmap (exit 4).
TEST_F(GpuMapTest, AWriteMapOfManyPagesHidesEveryOne) {
  constexpr uint64_t kPages = 1100;
  budget_pages_ = 2048;
  const proto::RegionReply r = Region("gmany", kPages);
  StartNodes({"emulated"}, r);
  EXPECT_EQ(RunClient(0, "gmany", [&](uint8_t* base) {
              auto* cpu = reinterpret_cast<volatile uint64_t*>(base);
              for (uint64_t p = 0; p < kPages; ++p) cpu[p * kPage / 8] = 7;  // mapped, writable
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              auto* words = static_cast<uint64_t*>(dev);
              for (uint64_t p = 0; p < kPages; ++p) words[p * kPage / 8] = Pattern(p, 0, 3);
              if (dsvm_gpu_unmap(base, kPages * kPage) != DSVM_OK) return 3;
              for (uint64_t p = 0; p < kPages; ++p) {
                if (cpu[p * kPage / 8] != Pattern(p, 0, 3)) {
                  std::fprintf(stderr, "page %lu: the CPU sees %#lx\n", p,
                               static_cast<unsigned long>(cpu[p * kPage / 8]));
                  return 4;
                }
              }
              return 0;
            }),
            0);
}

// A read map of pages all in the node's memory copies them straight from
// the memfd (docs/GPU.md, "Direct copies"), and dsvm_stats says so.
TEST_F(GpuMapTest, DsvmStatsCountsDirectCopies) {
  constexpr uint64_t kPages = 64;  // 256 KiB: one run, over direct_min_bytes
  budget_pages_ = 2 * kPages;
  const proto::RegionReply r = Region("gdirect", kPages);
  StartNodes({"emulated"}, r);
  EXPECT_EQ(RunClient(0, "gdirect", [&](uint8_t* base) {
              auto* cpu = reinterpret_cast<volatile uint64_t*>(base);
              for (uint64_t p = 0; p < kPages; ++p) cpu[p * kPage / 8] = Pattern(p, 0, 1);
              dsvm_node_stats_t before, after;
              if (dsvm_stats(&before) != DSVM_OK) return 1;
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 2;
              for (uint64_t p = 0; p < kPages; ++p) {
                uint64_t v;
                std::memcpy(&v, static_cast<uint8_t*>(dev) + p * kPage, 8);
                if (v != Pattern(p, 0, 1)) return 3;
              }
              if (dsvm_gpu_unmap(base, kPages * kPage) != DSVM_OK) return 4;
              if (dsvm_stats(&after) != DSVM_OK) return 5;
              if (after.gpu_pages_in - before.gpu_pages_in != kPages) return 6;
              return after.gpu_direct_pages_in - before.gpu_direct_pages_in == kPages ? 0 : 7;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().direct_pages_to_device, kPages);
    EXPECT_EQ(d.tier()->stats().blocks_registered, 1u);
  });
}

// dsvm_gpu_prefetch places pages as a map would, without pinning them: the
// map that follows copies nothing. A prefetch for writing takes the pages
// Modified; a local write after it makes the map copy the new bytes.
TEST_F(GpuMapTest, APrefetchPlacesPagesForALaterMap) {
  const proto::RegionReply r = Region("gpre", 16);
  StartNodes({"emulated", "emulated"}, r);
  constexpr uint64_t kPages = 8;
  for (uint64_t p = 0; p < kPages; ++p) nodes_[1]->WriteU64(r.base + p * kPage, 500 + p);
  uint64_t copied = 0;
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              if (dsvm_gpu_prefetch(base + 8, kPages * kPage - 16, 0, 0) != DSVM_OK) return 1;
              return 0;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.gpu_mapped_pages(), 0u) << "a prefetch pins nothing";
    EXPECT_EQ(d.stats().gpu_prefetches, 1u);
    copied = d.tier()->stats().pages_to_device;
    EXPECT_EQ(copied, kPages) << "widened to whole pages, each copied once";
  });
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              const auto* words = static_cast<const uint64_t*>(dev);
              for (uint64_t p = 0; p < kPages; ++p) {
                if (words[p * kPage / 8] != 500 + p) return 2;
              }
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK ? 0 : 3;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_device, copied) << "the map found every page in place";
  });
  // For writing: Modified here, and still nothing to copy for a map, as no
  // local process wrote the pages since...
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              return dsvm_gpu_prefetch(base, kPages * kPage, 0, DSVM_PREFETCH_WRITE) == DSVM_OK ? 0 : 1;
            }),
            0);
  uint64_t faults = 0;
  nodes_[0]->Sync([&](NodeDaemon& d) {
    copied = d.tier()->stats().pages_to_device;
    faults = d.stats().client_faults;
  });
  // Local reads go on without a fault: the pages are only write-protected.
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              for (uint64_t p = 0; p < kPages; ++p) {
                if (*reinterpret_cast<volatile uint64_t*>(base + p * kPage) != 500 + p) return 1;
              }
              return 0;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.stats().client_faults, faults); });
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              const bool ok = static_cast<const uint64_t*>(dev)[kPage / 8] == 501;
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK && ok ? 0 : 2;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_device, copied) << "Modified, untouched: in place";
  });
  // ...but once a local process wrote page 0, the map must see that write.
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              *reinterpret_cast<volatile uint64_t*>(base) = 777;
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              const bool ok = static_cast<const uint64_t*>(dev)[0] == 777;
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK && ok ? 0 : 2;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    for (uint64_t p = 0; p < kPages; ++p) {
      EXPECT_EQ(d.agent().StateOf(r.base + p * kPage), node::PageState::kModified) << p;
    }
  });
  EXPECT_EQ(RunClient(0, "gpre", [&](uint8_t* base) {
              const bool refused = dsvm_gpu_prefetch(nullptr, 8, 0, 0) == DSVM_EINVALID_ARGUMENT &&
                                   dsvm_gpu_prefetch(base, 0, 0, 0) == DSVM_EINVALID_ARGUMENT &&
                                   dsvm_gpu_prefetch(base, 8, -1, 0) == DSVM_EINVALID_ARGUMENT &&
                                   dsvm_gpu_prefetch(base, 8, 7, 0) == DSVM_EINVALID_ARGUMENT &&
                                   dsvm_gpu_prefetch(base, 8, 0, 4) == DSVM_EINVALID_ARGUMENT;
              return refused ? 0 : 1;
            }),
            0);
}

// A read map of pages local processes hold Modified and may write: the
// pages are write-protected for the map, so its clean GPU copy is still
// trusted after the unmap and the next map finds them in place (a chunk
// streamed through the budget is reused from HBM); a local write after it
// is seen by the next map all the same. Fails without: every map copied
// the pages again (they stayed writable, so each map evicted their copy).
TEST_F(GpuMapTest, AReadMapOfPagesLocalProcessesMayWriteIsReusedUntilTheyDo) {
  const proto::RegionReply r = Region("gmod", 16);
  StartNodes({"emulated"}, r);
  constexpr uint64_t kPages = 8;
  auto map_and_check = [&](uint64_t first_word) {
    return RunClient(0, "gmod", [&](uint8_t* base) {
      void* dev = nullptr;
      if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
      const auto* words = static_cast<const uint64_t*>(dev);
      bool ok = words[0] == first_word;
      for (uint64_t p = 1; p < kPages; ++p) ok = ok && words[p * kPage / 8] == 600 + p;
      return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK && ok ? 0 : 2;
    });
  };
  EXPECT_EQ(RunClient(0, "gmod", [&](uint8_t* base) {
              for (uint64_t p = 0; p < kPages; ++p) {
                *reinterpret_cast<volatile uint64_t*>(base + p * kPage) = 600 + p;
              }
              return 0;
            }),
            0);
  EXPECT_EQ(map_and_check(600), 0);
  uint64_t copied = 0, faults = 0;
  nodes_[0]->Sync([&](NodeDaemon& d) {
    copied = d.tier()->stats().pages_to_device;
    faults = d.stats().client_faults;
    EXPECT_EQ(copied, kPages);
    for (uint64_t p = 0; p < kPages; ++p) {
      EXPECT_EQ(d.agent().StateOf(r.base + p * kPage), node::PageState::kModified) << p;
    }
  });
  EXPECT_EQ(map_and_check(600), 0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_device, copied) << "untouched since: in place";
  });
  // Local reads go on without a fault; a local write is seen by the next map.
  EXPECT_EQ(RunClient(0, "gmod", [&](uint8_t* base) {
              for (uint64_t p = 0; p < kPages; ++p) {
                if (*reinterpret_cast<volatile uint64_t*>(base + p * kPage) != 600 + p) return 1;
              }
              *reinterpret_cast<volatile uint64_t*>(base) = 999;
              return 0;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().client_faults, faults + 1) << "the write alone faulted";
  });
  EXPECT_EQ(map_and_check(999), 0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_device, copied + 1) << "only the written page";
  });
}

// A local write that comes while a read map copies the page (the
// emulated GPU's copies slowed to 400 ms) is seen by the next map: the
// pages are write-protected before anything is copied, so the write
// faults, waits for the map, and makes the next map copy the page again.
// Fails when the hiding came after the copy: the write landed unseen
// between the two, and the next map trusted the stale GPU copy.
TEST_F(GpuMapTest, AWriteDuringAReadMapsCopyIsSeenByTheNextMap) {
  const proto::RegionReply r = Region("gmid", 16);
  node::NodeDaemonOptions o = Options(0);
  o.gpu_copy_threads = 1;
  o.emulated_copy_delay = std::chrono::milliseconds(400);
  auto d = NodeDaemon::Create(o);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
  nodes_[0]->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(r).ok()); });
  constexpr uint64_t kPages = 8;
  EXPECT_EQ(RunClient(0, "gmid", [&](uint8_t* base) {
              for (uint64_t p = 0; p < kPages; ++p) {
                *reinterpret_cast<volatile uint64_t*>(base + p * kPage) = 600 + p;
              }
              std::atomic<int> mapped{-1};
              std::thread mapper([&] {
                void* dev = nullptr;
                int rc = dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev);
                if (rc == DSVM_OK) rc = dsvm_gpu_unmap(base, kPages * kPage);
                mapped = rc;
              });
              std::this_thread::sleep_for(std::chrono::milliseconds(150));  // mid-copy
              *reinterpret_cast<volatile uint64_t*>(base) = 4242;
              mapper.join();
              if (mapped != DSVM_OK) return 1;
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 2;
              const uint64_t seen = static_cast<const uint64_t*>(dev)[0];
              if (dsvm_gpu_unmap(base, kPages * kPage) != DSVM_OK) return 3;
              if (seen != 4242) {
                std::fprintf(stderr, "client: the second map saw %llu\n",
                             static_cast<unsigned long long>(seen));
                return 4;
              }
              return 0;
            }),
            0);
}

// Preferred-GPU advice: pages read here under it get a copy on that GPU at
// once, so a later map copies nothing; pages held here already are placed
// when the advice is given; normal advice ends it. (A budget of 64 pages,
// so that the test's arenas, an eighth of it, hold the 8 pages placed:
// pages placed one by one are a run in place only within one arena.)
TEST_F(GpuMapTest, PreferredGpuAdvicePlacesPagesReadHere) {
  const proto::RegionReply r = Region("gpref", 16);
  budget_pages_ = 64;
  StartNodes({"emulated", "none"}, r);
  constexpr uint64_t kPages = 8;
  for (uint64_t p = 0; p < 2 * kPages; ++p) nodes_[1]->WriteU64(r.base + p * kPage, 900 + p);
  auto on_gpu = [&](uint64_t first, uint64_t n) {
    uint64_t count = 0;
    nodes_[0]->Sync([&](NodeDaemon& d) {
      for (uint64_t p = first; p < first + n; ++p) {
        count += d.tier()->table().GpuOf(r.base + p * kPage) == std::optional<uint32_t>(0);
      }
    });
    return count;
  };
  auto read_all = [&](uint8_t* base, uint64_t first, uint64_t n) {
    for (uint64_t p = first; p < first + n; ++p) {
      if (*reinterpret_cast<volatile uint64_t*>(base + p * kPage) != 900 + p) return false;
    }
    return true;
  };
  EXPECT_EQ(RunClient(0, "gpref", [&](uint8_t* base) {
              if (dsvm_advise(base, kPages * kPage, DSVM_ADVICE_PREFERRED_GPU, 0) != DSVM_OK) return 1;
              return read_all(base, 0, 2 * kPages) ? 0 : 2;
            }),
            0);
  EXPECT_EQ(on_gpu(0, kPages), kPages) << "read under the advice: placed";
  EXPECT_EQ(on_gpu(kPages, kPages), 0u) << "no advice: not placed";
  uint64_t copied = 0;
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().gpu_placed, kPages);
    EXPECT_EQ(d.gpu_mapped_pages(), 0u) << "placement pins nothing";
    copied = d.tier()->stats().pages_to_device;
  });
  EXPECT_EQ(RunClient(0, "gpref", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              for (uint64_t p = 0; p < kPages; ++p) {
                if (static_cast<const uint64_t*>(dev)[p * kPage / 8] != 900 + p) return 2;
              }
              if (dsvm_gpu_unmap(base, kPages * kPage) != DSVM_OK) return 3;
              // Held here already (read above): placed when advised.
              return dsvm_advise(base + kPages * kPage, kPages * kPage, DSVM_ADVICE_PREFERRED_GPU, 0) ==
                             DSVM_OK
                         ? 0
                         : 4;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->stats().pages_to_device, copied + kPages)
        << "the map copied nothing; the advice placed the other eight";
  });
  EXPECT_EQ(on_gpu(kPages, kPages), kPages);
  // Normal advice ends it: page 0, taken by node 1 and read here again,
  // stays on the host.
  EXPECT_EQ(RunClient(0, "gpref", [&](uint8_t* base) {
              return dsvm_advise(base, 2 * kPages * kPage, DSVM_ADVICE_NORMAL, 0) == DSVM_OK ? 0 : 1;
            }),
            0);
  nodes_[1]->WriteU64(r.base, 900);
  EXPECT_EQ(on_gpu(0, 1), 0u) << "node 1's write dropped the GPU copy";
  EXPECT_EQ(RunClient(0, "gpref", [&](uint8_t* base) { return read_all(base, 0, 1) ? 0 : 1; }), 0);
  EXPECT_EQ(on_gpu(0, 1), 0u);
  // Bad GPU advice, and GPU advice to a daemon without a GPU tier.
  EXPECT_EQ(RunClient(0, "gpref", [&](uint8_t* base) {
              return dsvm_advise(base, kPage, DSVM_ADVICE_PREFERRED_GPU, 5) == DSVM_EINVALID_ARGUMENT ? 0 : 1;
            }),
            0);
  EXPECT_EQ(RunClient(1, "gpref", [&](uint8_t* base) {
              return dsvm_advise(base, kPage, DSVM_ADVICE_PREFERRED_GPU, 0) == DSVM_EFAILED_PRECONDITION ? 0 : 1;
            }),
            0);
}

// Accessed-by advice: a map on that GPU is of the host copy itself
// (zero-copy): nothing is copied to GPU memory, the GPU's writes are the
// node's at once, and ownership is held as for any map. A dirty GPU copy
// from an earlier map is written back first.
TEST_F(GpuMapTest, AccessedByMapsTheHostCopy) {
  const proto::RegionReply r = Region("gzc", 16);
  StartNodes({"emulated", "none"}, r);
  constexpr uint64_t kPages = 4;
  for (uint64_t p = 0; p < kPages; ++p) nodes_[1]->WriteU64(r.base + p * kPage, 40 + p);
  EXPECT_EQ(RunClient(0, "gzc", [&](uint8_t* base) {
              // First an ordinary write map: page 1 dirty in GPU memory.
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              static_cast<uint64_t*>(dev)[kPage / 8] = 777;
              if (dsvm_gpu_unmap(base, kPages * kPage) != DSVM_OK) return 2;
              if (dsvm_advise(base, kPages * kPage, DSVM_ADVICE_ACCESSED_BY, 0) != DSVM_OK) return 3;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 4;
              if (dev != base) return 5;  // emulated: the device pointer is the address
              const auto* words = static_cast<const volatile uint64_t*>(dev);
              if (words[0] != 40 || words[kPage / 8] != 777 || words[2 * kPage / 8] != 42) return 6;
              static_cast<volatile uint64_t*>(dev)[3 * kPage / 8] = 888;  // "the GPU" writes
              dsvm_node_stats_t st;
              if (dsvm_stats(&st) != DSVM_OK || st.gpu_maps != 2 || st.gpu_zero_copy_maps != 1 ||
                  st.gpu_pages_in != kPages) {
                return 7;
              }
              return 0;  // exits holding the map: it ends with the client
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().gpu_zero_copy_maps, 1u);
    EXPECT_EQ(d.tier()->stats().pages_to_device, kPages) << "only the first map copied";
    EXPECT_FALSE(d.tier()->table().GpuOf(r.base + 3 * kPage).has_value())
        << "a zero-copy write map drops GPU copies that would go stale";
  });
  EXPECT_EQ(nodes_[1]->ReadU64(r.base + 3 * kPage), 888u);
  EXPECT_EQ(nodes_[1]->ReadU64(r.base + kPage), 777u);
  // A map's pages must all or none have the advice; normal advice ends it.
  EXPECT_EQ(RunClient(0, "gzc", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, 2 * kPages * kPage, 0, DSVM_GPU_READ, &dev) !=
                  DSVM_EINVALID_ARGUMENT) {
                return 1;
              }
              if (dsvm_advise(base, kPages * kPage, DSVM_ADVICE_NORMAL, 0) != DSVM_OK) return 2;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 3;
              const bool copied = dev != base && static_cast<const uint64_t*>(dev)[0] == 40;
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK && copied ? 0 : 4;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.stats().gpu_zero_copy_maps, 1u); });
  EXPECT_EQ(RunClient(0, "gzc", [&](uint8_t* base) {
              return dsvm_advise(base, kPage, DSVM_ADVICE_ACCESSED_BY, 3) == DSVM_EINVALID_ARGUMENT ? 0 : 1;
            }),
            0);
}

// Read-mostly advice: while one process maps pages on GPU 0, another maps
// them on GPU 1 and gets a replica there (without the advice that map is
// refused: the pages are mapped on GPU 0); GPU 0's copy stays.
TEST_F(GpuMapTest, ReadMostlyPagesAreReplicatedOnAnotherGpu) {
  const proto::RegionReply r = Region("grm", 16);
  {
    node::NodeDaemonOptions o = Options(0, "emulated");
    o.emulated_gpus = 2;
    auto d = NodeDaemon::Create(o);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
  }
  {
    auto d = NodeDaemon::Create(Options(1, "none"));
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
  }
  for (auto& n : nodes_) n->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(r).ok()); });
  constexpr uint64_t kPages = 8;
  for (uint64_t p = 0; p < kPages; ++p) nodes_[1]->WriteU64(r.base + p * kPage, 300 + p);
  int mapped[2], go[2];
  ASSERT_EQ(::pipe(mapped), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t holder = QuietFork();
  if (holder == 0) {
    ::_exit(ClientMain(0, "grm", [&](uint8_t* base) {
      if (dsvm_advise(base, kPages * kPage, DSVM_ADVICE_READ_MOSTLY, 0) != DSVM_OK) return 1;
      void* dev = nullptr;
      if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 2;
      char c = 1;
      if (::write(mapped[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) return 3;
      return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK ? 0 : 4;
    }));
  }
  char c;
  ASSERT_EQ(::read(mapped[0], &c, 1), 1);
  EXPECT_EQ(RunClient(0, "grm", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 1, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              for (uint64_t p = 0; p < kPages; ++p) {
                if (static_cast<const uint64_t*>(dev)[p * kPage / 8] != 300 + p) return 2;
              }
              if (dsvm_gpu_unmap(base, kPages * kPage) != DSVM_OK) return 3;
              // Normal advice: the pages, mapped on GPU 0, cannot come to GPU 1.
              if (dsvm_advise(base, kPages * kPage, DSVM_ADVICE_NORMAL, 0) != DSVM_OK) return 4;
              return dsvm_gpu_map(base, kPages * kPage, 1, DSVM_GPU_READ, &dev) ==
                             DSVM_EFAILED_PRECONDITION
                         ? 0
                         : 5;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().gpu_replica_maps, 1u);
    for (uint64_t p = 0; p < kPages; ++p) {
      EXPECT_EQ(d.tier()->table().GpuOf(r.base + p * kPage), std::optional<uint32_t>(0)) << p;
    }
    EXPECT_EQ(d.tier()->stats().replica_runs, 1u);
  });
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(holder, &status, 0), holder);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "holder step " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.gpu_mapped_pages(), 0u); });
  for (int fd : {mapped[0], mapped[1], go[0], go[1]}) ::close(fd);
}

TEST_F(GpuMapTest, AReadMapSeesWritesOfAnotherNode) {
  const proto::RegionReply r = Region("gr", 32);
  StartNodes({"emulated", "emulated", "none"}, r);
  constexpr uint64_t kPages = 6;
  for (int round = 1; round <= 3; ++round) {
    for (uint64_t p = 0; p < kPages; ++p) nodes_[1]->WriteU64(r.base + p * kPage + 64, Pattern(p, 8, round));
    EXPECT_EQ(RunClient(0, "gr", [&](uint8_t* base) {
                void* dev = nullptr;
                if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
                const auto* bytes = static_cast<const uint8_t*>(dev);
                for (uint64_t p = 0; p < kPages; ++p) {
                  uint64_t v;
                  std::memcpy(&v, bytes + p * kPage + 64, 8);
                  if (v != Pattern(p, 8, round)) return 10 + static_cast<int>(p);
                }
                return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK ? 0 : 2;
              }),
              0)
        << "round " << round;
    if (round == 1) {
      for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(nodes_[2]->ReadU64(r.base + p * kPage + 64), Pattern(p, 8, 1));
    }
  }
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.tier()->table().stats().drops, 2 * kPages) << "node 1's writes dropped the GPU copies";
    EXPECT_EQ(d.tier()->stats().pages_to_device, 3 * kPages);
    EXPECT_EQ(d.stats().gpu_maps, 3u);
  });
}

// While a write map holds a page, another node's request for it waits; the
// unmap lets it through, with the bytes the GPU wrote.
TEST_F(GpuMapTest, AMapHoldsItsPagesUntilUnmap) {
  const proto::RegionReply r = Region("gh", 8);
  StartNodes({"emulated", "emulated"}, r);
  const pid_t pid = HoldWriteMap("gh");
  auto reader = std::async(std::launch::async, [&] { return nodes_[1]->ReadU64(r.base); });
  // Node 1's read reaches node 0 as a directory request, which waits.
  EXPECT_TRUE(WaitFor(0, [](NodeDaemon& d) { return d.deferred_count() > 0; }));
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.gpu_mapped_pages(), 1u); });
  ReleaseWriteMap();
  EXPECT_EQ(reader.get(), kHeldLast) << "the last write before the unmap wins";
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_GE(d.stats().deferred_requests, 1u);
    EXPECT_EQ(d.deferred_count(), 0u);
  });
}

// Direct reads (PROTOCOL.md) with GPU tiers on both nodes: node 1's read
// faults ask node 0, whose pages are dirty on its GPU after a write map, and
// node 0 answers with its GPU's bytes, written back first as for a Fetch.
TEST_F(GpuMapTest, AHolderWithAGpuTierServesReadsFromItsDirtyGpuCopy) {
  const proto::RegionReply r = Region("gd", 32);
  StartNodes({"emulated", "emulated"}, r);
  constexpr uint64_t kPages = 8;
  ASSERT_EQ(RunClient(0, "gd", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              auto* words = static_cast<uint64_t*>(dev);
              for (uint64_t p = 0; p < kPages; ++p) {
                for (uint64_t w = 0; w < kPage / 8; ++w) words[p * kPage / 8 + w] = Pattern(p, w, 1);
              }
              return dsvm_gpu_unmap(base, kPages * kPage) == DSVM_OK ? 0 : 2;
            }),
            0);
  // Read through plain loads: faults, which ask node 0 once a page of the
  // region came from it. In a scattered order (a stride of 3), so that no
  // sequential read-ahead fetches pages without a fault.
  ASSERT_EQ(RunClient(1, "gd", [&](uint8_t* base) {
              const auto* words = reinterpret_cast<const volatile uint64_t*>(base);
              for (uint64_t i = 0; i < kPages; ++i) {
                const uint64_t p = i * 3 % kPages;
                for (uint64_t w = 0; w < kPage / 8; ++w) {
                  if (words[p * kPage / 8 + w] != Pattern(p, w, 1)) return 10 + static_cast<int>(p);
                }
              }
              return 0;
            }),
            0);
  uint64_t served = 0;
  nodes_[0]->Sync([&](NodeDaemon& d) {
    served = d.agent().stats().direct_served;
    EXPECT_EQ(d.tier()->stats().pages_to_host, kPages) << "every page written back once";
  });
  nodes_[1]->Sync([&](NodeDaemon& d) {
    EXPECT_GE(d.agent().stats().direct_installs, 1u);
    EXPECT_LE(d.agent().stats().direct_installs, served);
  });
}

// A page a GPU write map holds is not served to an ask: its current bytes
// are the GPU's until the unmap. Node 1's read fault asks node 0 (it sent
// node 1 another page of the region before) while a process of node 0
// holds a write map of the page; the read waits for the unmap and sees the
// map's last write. Fails without the daemon's check: node 0 served the
// bytes of the first write, at the version the grant then named.
TEST_F(GpuMapTest, APageAGpuWriteMapHoldsIsNotServedToAnAsk) {
  const proto::RegionReply r = Region("gq", 8);
  StartNodes({"emulated", "emulated"}, r);
  nodes_[0]->WriteU64(r.base + kPage, 7);
  const pid_t mapper = HoldWriteMap("gq");
  const pid_t reader = QuietFork();
  if (reader == 0) {
    ::_exit(ClientMain(1, "gq", [&](uint8_t* base) {
      const auto* words = reinterpret_cast<const volatile uint64_t*>(base);
      if (words[kPage / 8] != 7) return 1;  // from node 0: the next fault asks it
      return words[0] == kHeldLast ? 0 : 2;
    }));
  }
  EXPECT_TRUE(WaitFor(0, [](NodeDaemon& d) {
    return d.stats().direct_reads_refused > 0 && d.deferred_count() > 0;
  })) << "node 1's ask and the directory's Fetch reach node 0";
  ReleaseWriteMap();
  int status = 0;
  ASSERT_EQ(::waitpid(reader, &status, 0), reader);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  ASSERT_EQ(::waitpid(mapper, &status, 0), mapper);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.agent().stats().direct_served, 0u); });
}

// A working set four times the GPU budget, streamed through write maps of a
// quarter of the budget each, three times over, with the data written first
// on another node: every page ends right, and pages left the GPU (dirty
// ones written back) to make room. The start of the oversubscription example.
TEST_F(GpuMapTest, AWorkingSetLargerThanTheBudgetStreamsCorrectly) {
  constexpr uint64_t kPages = 4 * kBudgetPages, kChunk = kBudgetPages / 4, kRounds = 3;
  const proto::RegionReply r = Region("gs", kPages);
  StartNodes({"emulated", "emulated"}, r);
  for (uint64_t p = 0; p < kPages; ++p) nodes_[1]->WriteU64(r.base + p * kPage, Pattern(p, 0, 0));
  EXPECT_EQ(RunClient(0, "gs", [&](uint8_t* base) {
              for (uint64_t round = 1; round <= kRounds; ++round) {
                for (uint64_t first = 0; first < kPages; first += kChunk) {
                  void* dev = nullptr;
                  if (dsvm_gpu_map(base + first * kPage, kChunk * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) {
                    return 1;
                  }
                  auto* bytes = static_cast<uint8_t*>(dev);
                  for (uint64_t p = 0; p < kChunk; ++p) {
                    uint64_t v;
                    std::memcpy(&v, bytes + p * kPage, 8);
                    if (v != Pattern(first + p, 0, round - 1)) return 10;
                    v = Pattern(first + p, 0, round);
                    std::memcpy(bytes + p * kPage, &v, 8);
                  }
                  if (dsvm_gpu_unmap(base + first * kPage, kChunk * kPage) != DSVM_OK) return 2;
                }
              }
              return 0;
            }),
            0);
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(nodes_[1]->ReadU64(r.base + p * kPage), Pattern(p, 0, kRounds)) << "page " << p;
  }
  nodes_[0]->Sync([&](NodeDaemon& d) {
    const node::DeviceTierStats& s = d.tier()->stats();
    EXPECT_EQ(d.stats().gpu_maps, kRounds * kPages / kChunk);
    EXPECT_EQ(d.stats().gpu_maps_failed, 0u);
    const node::TierTableStats& t = d.tier()->table().stats();
    // Every map of a page either copied it in or found it still there, and
    // a page can have stayed on the GPU from one round to the next only
    // while it fit the budget.
    EXPECT_EQ(t.hits + t.misses, kRounds * kPages);
    EXPECT_EQ(s.pages_to_device, t.misses);
    EXPECT_GE(s.pages_to_device, kRounds * kPages - (kRounds - 1) * kBudgetPages);
    // Each stay on the GPU ended dirty, so with one write-back: evicted to
    // make room, or asked for by node 1's reads at the end.
    EXPECT_EQ(s.pages_to_host, s.pages_to_device);
    EXPECT_GE(s.run_evictions, s.pages_to_device - kBudgetPages);
    // What dsvm_stats and dsvmctl report.
    const proto::NodeCounters c = d.Counters();
    EXPECT_EQ(c.gpu_pages_in, s.pages_to_device);
    EXPECT_EQ(c.gpu_pages_out, s.pages_to_host);
    EXPECT_EQ(c.gpu_direct_pages_in, s.direct_pages_to_device);
    EXPECT_EQ(c.gpu_direct_pages_out, s.direct_pages_to_host);
  });
}

// Bad arguments are refused with clear codes and words, and change nothing.
TEST_F(GpuMapTest, BadArgumentsGiveClearErrors) {
  const proto::RegionReply r = Region("gb", 64);
  StartNodes({"emulated", "none"}, r);
  void* dev = nullptr;
  EXPECT_EQ(dsvm_gpu_map(reinterpret_cast<void*>(r.base), kPage, 0, DSVM_GPU_READ, &dev),
            DSVM_ENOT_INITIALIZED);
  auto has = [](const char* words) { return std::strstr(dsvm_last_error(), words) != nullptr; };
  EXPECT_EQ(RunClient(0, "gb", [&](uint8_t* base) {
              void* d = nullptr;
              if (dsvm_gpu_map(base + 100, kPage, 0, DSVM_GPU_READ, &d) != DSVM_EINVALID_ARGUMENT ||
                  !has("multiples of the region's page size")) return 1;
              if (dsvm_gpu_map(base, kPage + 1, 0, DSVM_GPU_READ, &d) != DSVM_EINVALID_ARGUMENT) return 2;
              if (dsvm_gpu_map(base, 0, 0, DSVM_GPU_READ, &d) != DSVM_EINVALID_ARGUMENT) return 3;
              if (dsvm_gpu_map(base, kPage, 1, DSVM_GPU_READ, &d) != DSVM_EINVALID_ARGUMENT ||
                  !has("does not exist")) return 4;
              if (dsvm_gpu_map(base, kPage, -1, DSVM_GPU_READ, &d) != DSVM_EINVALID_ARGUMENT) return 5;
              if (dsvm_gpu_map(base, kPage, 0, 0, &d) != DSVM_EINVALID_ARGUMENT ||
                  dsvm_gpu_map(base, kPage, 0, 4, &d) != DSVM_EINVALID_ARGUMENT || !has("mode")) return 6;
              if (dsvm_gpu_map(base, kPage, 0, DSVM_GPU_READ, nullptr) != DSVM_EINVALID_ARGUMENT) return 7;
              if (dsvm_gpu_map(base + 64 * kPage, kPage, 0, DSVM_GPU_READ, &d) != DSVM_EINVALID_ARGUMENT ||
                  !has("not inside a region")) return 8;
              if (dsvm_gpu_map(base, (kBudgetPages + 1) * kPage, 0, DSVM_GPU_READ, &d) !=
                      DSVM_ERESOURCE_EXHAUSTED || !has("budget")) return 9;
              if (dsvm_gpu_map(base, 4 * kPage, 0, DSVM_GPU_WRITE, &d) != DSVM_OK) return 10;
              void* again = nullptr;
              if (dsvm_gpu_map(base + 2 * kPage, 4 * kPage, 0, DSVM_GPU_READ, &again) !=
                      DSVM_EFAILED_PRECONDITION || !has("mapped already")) return 11;
              if (dsvm_gpu_map(base, 4 * kPage, 0, DSVM_GPU_WRITE, &again) != DSVM_OK || again != d) return 12;
              if (dsvm_gpu_unmap(base, 2 * kPage) != DSVM_EINVALID_ARGUMENT || !has("no gpu map")) return 13;
              if (dsvm_gpu_unmap(base + 1, kPage) != DSVM_EINVALID_ARGUMENT) return 14;
              if (dsvm_gpu_unmap(base, 4 * kPage) != DSVM_OK || dsvm_gpu_unmap(base, 4 * kPage) != DSVM_OK) return 15;
              if (dsvm_gpu_unmap(base, 4 * kPage) != DSVM_EINVALID_ARGUMENT) return 16;
              if (std::strlen(dsvm_strerror(DSVM_EFAILED_PRECONDITION)) == 0) return 17;
              return 0;
            }),
            0);
  // The map larger than the budget was refused before it acquired anything.
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.agent().StateOf(r.base + kBudgetPages * kPage), node::PageState::kInvalid);
  });
  // A daemon without a GPU tier says so.
  EXPECT_EQ(RunClient(1, "gb", [&](uint8_t* base) {
              void* d = nullptr;
              return dsvm_gpu_map(base, kPage, 0, DSVM_GPU_READ, &d) == DSVM_EFAILED_PRECONDITION &&
                             has("--device-backend none")
                         ? 0
                         : 1;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.gpu_mapped_pages(), 0u); });
}

// Past its host budget a node gives its coldest pages up through the
// directory (remote swap): they move to the other node, nothing is lost,
// and a gpu map brings pages back.
// Preferred-node advice (dsvm_advise DSVM_ADVICE_PREFERRED_NODE) names where
// the pages node 0 has no room for go: every page that leaves it lands on
// node 3, none on nodes 1 and 2 (where the directory's own choice spreads
// them).
TEST_F(GpuMapTest, PagesPastTheHostBudgetGoToThePreferredNode) {
  constexpr uint64_t kPages = 24, kHostPages = 8;
  const proto::RegionReply r = Region("gp", kPages);
  StartNodes({"emulated", "none", "none", "none"}, r, kHostPages * kPage);
  proto::NodeId preferred = 0;
  nodes_[3]->Sync([&](NodeDaemon& d) { preferred = d.id(); });
  EXPECT_EQ(RunClient(0, "gp", [&](uint8_t* base) {
              if (dsvm_advise(base, kPages * kPage, DSVM_ADVICE_PREFERRED_NODE, 0) !=
                  DSVM_EINVALID_ARGUMENT) {
                return 1;  // the advice needs a node
              }
              return dsvm_advise(base, kPages * kPage, DSVM_ADVICE_PREFERRED_NODE, preferred) ==
                             DSVM_OK
                         ? 0
                         : 2;
            }),
            0);
  for (uint64_t p = 0; p < kPages; ++p) nodes_[0]->WriteU64(r.base + p * kPage, Pattern(p, 0, 4));
  ASSERT_TRUE(WaitFor(0, [&](NodeDaemon& d) {
    return d.tier()->table().host_bytes() <= kHostPages * kPage && d.stats().pages_left > 0;
  }));
  uint64_t left = 0;
  nodes_[0]->Sync([&](NodeDaemon& d) { left = d.stats().pages_left; });
  EXPECT_GE(left, kPages - kHostPages);
  ASSERT_TRUE(WaitFor(3, [&](NodeDaemon& d) {
    uint64_t held = 0;
    for (uint64_t p = 0; p < kPages; ++p) {
      held += d.agent().StateOf(r.base + p * kPage) != node::PageState::kInvalid;
    }
    return held >= kPages - kHostPages;
  }));
  for (int other : {1, 2}) {
    nodes_[other]->Sync([&](NodeDaemon& d) {
      for (uint64_t p = 0; p < kPages; ++p) {
        EXPECT_EQ(d.agent().StateOf(r.base + p * kPage), node::PageState::kInvalid)
            << "node " << other << " page " << p;
      }
    });
  }
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(nodes_[3]->ReadU64(r.base + p * kPage), Pattern(p, 0, 4)) << "page " << p;
  }
}

TEST_F(GpuMapTest, PagesPastTheHostBudgetLeaveTheNode) {
  constexpr uint64_t kPages = 24, kHostPages = 8;
  const proto::RegionReply r = Region("gl", kPages);
  StartNodes({"emulated", "none"}, r, kHostPages * kPage);
  for (uint64_t p = 0; p < kPages; ++p) nodes_[0]->WriteU64(r.base + p * kPage, Pattern(p, 0, 3));
  ASSERT_TRUE(WaitFor(0, [&](NodeDaemon& d) {
    return d.tier()->table().host_bytes() <= kHostPages * kPage;
  }));
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_GE(d.stats().pages_left, kPages - kHostPages);
    EXPECT_GE(d.tier()->table().stats().leaves, kPages - kHostPages);
  });
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_EQ(nodes_[1]->ReadU64(r.base + p * kPage), Pattern(p, 0, 3)) << "page " << p;
  }
  // Page 0 left node 0 first; a read map fetches it back.
  EXPECT_EQ(RunClient(0, "gl", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, 2 * kPage, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
              uint64_t v;
              std::memcpy(&v, dev, 8);
              if (v != Pattern(0, 0, 3)) return 2;
              return dsvm_gpu_unmap(base, 2 * kPage) == DSVM_OK ? 0 : 3;
            }),
            0);
}

// A region deleted while a process on node 0 maps it is kept for that
// process; its pages are the coldest when node 0 goes past its host
// budget, but they must not leave: the directory no longer knows them
// (their addresses may be another region's by now), and the process's
// local reads of them must go on. Fails without: the host budget sent
// them away, and the process's next read died of SIGBUS.
TEST_F(GpuMapTest, TheHostBudgetSendsNoPageOfADeletedRegionAway) {
  constexpr uint64_t kKept = 8, kOther = 16, kHostPages = 12;
  const proto::RegionReply kept = Region("gkept", kKept);
  const proto::RegionReply other = Region("gother", kOther);
  StartNodes({"emulated", "none"}, kept, kHostPages * kPage);
  for (auto& n : nodes_) n->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(other).ok()); });
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = QuietFork();
  if (pid == 0) {
    ::signal(SIGBUS, SIG_DFL);  // not a sanitizer's report: the test wants the signal
    char c = 0;
    ::_exit(ClientMain(0, "gkept", [&](uint8_t* base) {
      auto word = [&](uint64_t p) { return reinterpret_cast<volatile uint64_t*>(base + p * kPage); };
      for (uint64_t p = 0; p < kKept; ++p) *word(p) = Pattern(p, 0, 7);
      if (::write(ready[1], "r", 1) != 1 || ::read(go[0], &c, 1) != 1) return 1;
      for (uint64_t p = 0; p < kKept; ++p) {
        if (*word(p) != Pattern(p, 0, 7)) return 2;
      }
      return 0;
    }));
  }
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  auto del = tool_.Call(proto::RegionDelete{.name = "gkept"});
  ASSERT_TRUE(del.ok());
  ASSERT_TRUE(WaitFor(0, [](NodeDaemon& d) { return d.deleted_kept() == 1; }));
  // Past the budget: pages must leave node 0, the kept region's not among them.
  for (uint64_t p = 0; p < kOther; ++p) nodes_[0]->WriteU64(other.base + p * kPage, p);
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_GT(d.stats().pages_left, 0u); });
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "status " << status << (WIFSIGNALED(status) ? " (killed by a signal)" : "");
  for (int fd : {ready[0], ready[1], go[0], go[1]}) ::close(fd);
}

// Bad GPU-tier options are refused before the daemon joins anything.
TEST_F(GpuMapTest, BadDeviceOptionsAreRefusedAtStartup) {
  auto refused = [&](node::NodeDaemonOptions o, const char* words) {
    auto d = NodeDaemon::Create(o);
    EXPECT_FALSE(d.ok());
    if (d.ok()) return;
    EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument) << d.status().ToString();
    EXPECT_NE(d.status().message().find(words), std::string::npos) << d.status().ToString();
  };
  node::NodeDaemonOptions o = Options(0);
  o.device_backend = "tpu";
  refused(o, "none of none, emulated and cuda");
  o = Options(0);
  o.gpu_budget_bytes = 0;
  refused(o, "GPU budget");
  o = Options(0, "none");
  o.host_budget_bytes = 1 << 20;
  refused(o, "host budget");
  o = Options(0);
  o.emulated_gpus = 0;
  refused(o, "1 to 64");
  o = Options(0);
  o.gpu_arena_bytes = 6000;
  refused(o, "multiple of 4 KiB");
  o = Options(0);
  o.gpu_pinned_limit_bytes = 1 << 20;
  refused(o, "--gpu-pinned-limit");
}

// A client killed while it holds a write map: its daemon ends the map, the
// pages are free for other nodes, and what it wrote through the device
// pointer before it died is what they read.
TEST_F(GpuMapTest, AClientKilledHoldingAMapReleasesIt) {
  const proto::RegionReply r = Region("gk", 16);
  StartNodes({"emulated", "emulated"}, r);
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t pid = QuietFork();
  if (pid == 0) {
    ::_exit(ClientMain(0, "gk", [&](uint8_t* base) {
      void* dev = nullptr;
      if (dsvm_gpu_map(base, 8 * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
      for (uint64_t p = 0; p < 8; ++p) {
        *reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(dev) + p * kPage) = Pattern(p, 0, 7);
      }
      char c = 1;
      if (::write(ready[1], &c, 1) != 1) return 2;
      ::pause();  // killed here
      return 3;
    }));
  }
  char c;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  nodes_[0]->Sync([&](NodeDaemon& d) { EXPECT_EQ(d.gpu_mapped_pages(), 8u); });
  ::kill(pid, SIGKILL);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_TRUE(WaitFor(0, [](NodeDaemon& d) { return d.gpu_mapped_pages() == 0; }));
  for (uint64_t p = 0; p < 8; ++p) {
    EXPECT_EQ(nodes_[1]->ReadU64(r.base + p * kPage), Pattern(p, 0, 7)) << "page " << p;
  }
  nodes_[1]->WriteU64(r.base, 1);  // takes the page from node 0: nothing holds it
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().gpu_unmaps, 1u);
    EXPECT_EQ(d.deferred_count(), 0u);
  });
  ::close(ready[0]);
  ::close(ready[1]);
}

// --- A node declared dead while a map is live -------------------------------------

class GpuMapDeathTest : public GpuMapTest {
 protected:
  void SetUp() override {
    coordinator_flags_ = {"--heartbeat-ms", "100", "--dead-after-ms", "600"};
    GpuMapTest::SetUp();
  }
};

// Node 0 stalls past its lease while a client holds a write map: declared
// dead, it drops every page. The map is lost, but its GPU memory stays the
// client's until it unmaps: no other page is put there (the bytes the
// client wrote stay; a map needing those slots does not fit), and the unmap
// says DSVM_EDATA_LOSS. After it, the memory is free again.
TEST_F(GpuMapDeathTest, ALostMapKeepsItsMemoryUntilUnmapped) {
  const proto::RegionReply r = Region("gl", 32);
  StartNodes({"emulated"}, r);
  int mapped[2], go[2];
  ASSERT_EQ(::pipe(mapped), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t pid = QuietFork();
  if (pid == 0) {
    ::_exit(ClientMain(0, "gl", [&](uint8_t* base) {
      void* lost = nullptr;
      if (dsvm_gpu_map(base, 8 * kPage, 0, DSVM_GPU_WRITE, &lost) != DSVM_OK) return 1;
      auto word = [&](void* dev, uint64_t p) {
        return reinterpret_cast<volatile uint64_t*>(static_cast<uint8_t*>(dev) + p * kPage);
      };
      for (uint64_t p = 0; p < 8; ++p) *word(lost, p) = Pattern(p, 0, 9);
      char c = 1;
      if (::write(mapped[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) return 2;
      // 16 pages of budget, 8 held by the lost map: 16 more do not fit.
      void* big = nullptr;
      if (dsvm_gpu_map(base + 16 * kPage, 16 * kPage, 0, DSVM_GPU_READ, &big) !=
          DSVM_ERESOURCE_EXHAUSTED) {
        return 3;
      }
      void* other = nullptr;
      if (dsvm_gpu_map(base + 8 * kPage, 8 * kPage, 0, DSVM_GPU_WRITE, &other) != DSVM_OK) return 4;
      for (uint64_t p = 0; p < 8; ++p) *word(other, p) = Pattern(p, 0, 10);
      for (uint64_t p = 0; p < 8; ++p) {
        if (*word(lost, p) != Pattern(p, 0, 9)) return 5;  // another page got its slot
      }
      if (dsvm_gpu_unmap(base, 8 * kPage) != DSVM_EDATA_LOSS) return 6;
      dsvm_node_stats_t st;
      if (dsvm_stats(&st) != DSVM_OK || st.gpu_maps_lost != 1) return 11;
      if (dsvm_gpu_unmap(base, 8 * kPage) != DSVM_EINVALID_ARGUMENT) return 7;  // ended
      if (dsvm_gpu_unmap(base + 8 * kPage, 8 * kPage) != DSVM_OK) return 8;
      if (dsvm_gpu_map(base + 16 * kPage, 16 * kPage, 0, DSVM_GPU_READ, &big) != DSVM_OK) return 9;
      return dsvm_gpu_unmap(base + 16 * kPage, 16 * kPage) == DSVM_OK ? 0 : 10;
    }));
  }
  char c;
  ASSERT_EQ(::read(mapped[0], &c, 1), 1);
  nodes_[0]->Stall(std::chrono::milliseconds(1500));
  EXPECT_TRUE(WaitFor(0, [](NodeDaemon& d) { return d.stats().gpu_maps_lost == 1; }));
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "client step " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().fresh_starts, 1u);
    EXPECT_EQ(d.gpu_mapped_pages(), 0u);
  });
  for (int fd : {mapped[0], mapped[1], go[0], go[1]}) ::close(fd);
}

// The death deadline of GpuMapLongCopyTest: 600 ms, or what
// DSVM_TEST_DEAD_AFTER_MS says (the kmod guest, ten times slower, 3000).
uint32_t LongCopyDeadAfterMs() {
  const char* env = std::getenv("DSVM_TEST_DEAD_AFTER_MS");
  return env != nullptr && std::atoi(env) > 0 ? static_cast<uint32_t>(std::atoi(env)) : 600;
}

class GpuMapLongCopyTest : public GpuMapTest {
 protected:
  void SetUp() override {
    coordinator_flags_ = {"--heartbeat-ms", "100", "--dead-after-ms",
                          std::to_string(LongCopyDeadAfterMs())};
    GpuMapTest::SetUp();
  }
};

// A map whose copies take longer than the coordinator's death deadline
// (64 MiB in 8 batches of 8 MiB, each copy of the emulated GPU slowed to
// 5/12 of the deadline: with two streams, about 1.7 deadlines in all)
// holds the daemon's loop all that time; the node keeps beating between
// batches, so it is not declared dead and the map is not lost. Fails
// without: the node was declared dead during the map, started afresh and
// lost it (the unmap said DSVM_EDATA_LOSS).
TEST_F(GpuMapLongCopyTest, ALongMapKeepsTheNodeAlive) {
  constexpr uint32_t kBig = 64u << 10;
  constexpr uint64_t kPages = 1024;  // 64 MiB
  auto reply = tool_.Call(proto::RegionCreate{
      .name = "glong", .size = kPages * kBig, .page_size = kBig, .mode = 0666});
  ASSERT_TRUE(reply.ok());
  const auto* r = std::get_if<proto::RegionReply>(&*reply);
  ASSERT_NE(r, nullptr);
  node::NodeDaemonOptions o = Options(0);
  o.gpu_budget_bytes = kPages * kBig;
  o.gpu_copy_threads = 1;
  o.emulated_copy_delay = std::chrono::milliseconds(LongCopyDeadAfterMs() * 5 / 12);
  auto d = NodeDaemon::Create(o);
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  nodes_.push_back(std::make_unique<RunningDaemon>(std::move(*d)));
  nodes_[0]->Sync([&](NodeDaemon& d) { ASSERT_TRUE(d.OpenRegion(*r).ok()); });
  EXPECT_EQ(RunClient(0, "glong", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base, kPages * kBig, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              auto* words = static_cast<uint64_t*>(dev);
              for (uint64_t p = 0; p < kPages; ++p) words[p * kBig / 8] = Pattern(p, 0, 3);
              // Time for a death notice to arrive, had there been one.
              std::this_thread::sleep_for(std::chrono::milliseconds(500));
              return dsvm_gpu_unmap(base, kPages * kBig) == DSVM_OK ? 0 : 2;
            }),
            0);
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().fresh_starts, 0u);
    EXPECT_EQ(d.stats().gpu_maps_lost, 0u);
    EXPECT_GE(d.tier()->stats().to_device_calls, 8u) << "the map took one copy per batch";
  });
  EXPECT_EQ(nodes_[0]->ReadU64(r->base + 5 * kBig), Pattern(5, 0, 3));
}

// A map's copies (64 MiB, each copy slowed by 300 ms: seconds in
// all, whatever the deadline DSVM_TEST_DEAD_AFTER_MS sets) do not hold node
// 0's loop: node 1 reads, one after another, pages node 0 holds outside
// the map, and node 0 serves their Fetches while the copies run. A write
// of a page inside the map waits for the copies (held), then for the
// unmap, and loses nothing. Fails without: node 0 served no directory
// message during the copies, and the first read waited for all of them.
TEST_F(GpuMapLongCopyTest, TheLoopServesOtherPagesDuringAMapsCopies) {
  constexpr uint32_t kBig = 64u << 10;
  constexpr uint64_t kPages = 1024, kOthers = 16;  // 64 MiB mapped, 1 MiB beside it
  // Node 0 holds every page: the map's acquisition is local, and its copies
  // start at once.
  proto::RegionReply region;
  StartSlowGpuNodeAndPlainNode("gserve", kPages + kOthers, kPages, std::chrono::milliseconds(300),
                               kPages + kOthers, &region);
  if (HasFatalFailure()) return;
  const proto::RegionReply* r = &region;
  std::atomic<bool> mapped{false};
  int map_rc = -1;
  std::thread mapper([&] {
    map_rc = RunClient(0, "gserve", [&](uint8_t* base) {
      void* dev = nullptr;
      if (dsvm_gpu_map(base, kPages * kBig, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
      if (*static_cast<uint64_t*>(dev) != Pattern(0, 0, 1)) return 2;
      return dsvm_gpu_unmap(base, kPages * kBig) == DSVM_OK ? 0 : 3;
    });
    mapped = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // copies under way
  uint64_t before_the_map = 0;
  for (uint64_t p = kPages; p < kPages + kOthers; ++p) {
    EXPECT_EQ(nodes_[1]->ReadU64(r->base + p * kBig), Pattern(p, 0, 1)) << "page " << p;
    before_the_map += !mapped;
  }
  nodes_[1]->WriteU64(r->base + 5 * kBig, 4242);  // a page of the map
  mapper.join();
  EXPECT_EQ(map_rc, 0);
  // All of them here; half leaves room for a slow machine (the kmod guest).
  EXPECT_GE(before_the_map, kOthers / 2) << "reads waited for the map's copies";
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_GE(d.stats().served_during_gpu_copies, kOthers / 2);
    EXPECT_GE(d.stats().held_for_gpu_copies, 1u);  // the write's Invalidate
    EXPECT_EQ(d.stats().fresh_starts, 0u);
  });
  EXPECT_EQ(nodes_[0]->ReadU64(r->base + 5 * kBig), 4242u);
  EXPECT_EQ(nodes_[0]->ReadU64(r->base + 6 * kBig), Pattern(6, 0, 1));
}

// A client that dies while node 0 serves during another's map: client B
// holds a map and waits on a prefetch of pages node 1 holds (node 1 is
// stalled), client A's map starts its copies, B is killed, then node 1
// answers. Node 0 completes B's prefetch while serving during A's copies
// and finds B gone when it answers: B's close (its map's pins need the
// tier) waits for the copies' end. Fails without: closing B there called
// the tier from its keep_alive, which stops the process.
TEST_F(GpuMapTest, AClientFoundGoneDuringAMapsCopiesIsClosedAfterThem) {
  // The events must meet: the kmod guest's slowness moves them apart.
  if (const char* b = std::getenv("DSVM_TEST_FAULT_BACKEND");
      b != nullptr && std::string(b) == "kmod") {
    GTEST_SKIP() << "timed for the VM's speed; the path is the daemon's, not the backend's";
  }
  constexpr uint32_t kBig = 64u << 10;
  constexpr uint64_t kPages = 256, kOthers = 16;
  // Pages [0, kPages + kOthers) on node 0 (A maps the first kPages, B the
  // next kOthers); the last kOthers on node 1, for B's prefetch. A's
  // copies take seconds.
  proto::RegionReply region;
  StartSlowGpuNodeAndPlainNode("ggone", kPages + 2 * kOthers, kPages + kOthers,
                               std::chrono::milliseconds(1000), kPages + kOthers, &region);
  if (HasFatalFailure()) return;
  const proto::RegionReply* r = &region;
  const proto::PageAddr remote = r->base + (kPages + kOthers) * kBig;
  for (uint64_t p = 0; p < kOthers; ++p) nodes_[1]->WriteU64(remote + p * kBig, 70 + p);
  // Every client is forked before node 1 stalls, one at a time: a fork
  // waits for every daemon's loop to be quiet (QuietFork).
  int ready[2], go[2], go_a[2], a_up[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  ASSERT_EQ(::pipe(go_a), 0);
  ASSERT_EQ(::pipe(a_up), 0);
  int a_rc = -1;
  std::thread a([&] {
    a_rc = RunClient(0, "ggone", [&](uint8_t* base) {
      char c = 0;
      if (::write(a_up[1], &c, 1) != 1 || ::read(go_a[0], &c, 1) != 1) return 3;
      void* dev = nullptr;
      if (dsvm_gpu_map(base, kPages * kBig, 0, DSVM_GPU_READ, &dev) != DSVM_OK) return 1;
      return dsvm_gpu_unmap(base, kPages * kBig) == DSVM_OK ? 0 : 2;
    });
  });
  char c = 0;
  ASSERT_EQ(::read(a_up[0], &c, 1), 1);  // A is forked
  int b_rc = -1;
  std::thread b([&] {
    b_rc = RunClient(0, "ggone", [&](uint8_t* base) {
      void* dev = nullptr;
      if (dsvm_gpu_map(base + kPages * kBig, kOthers * kBig, 0, DSVM_GPU_READ, &dev) != DSVM_OK) {
        return 1;
      }
      char c = 0;
      if (::write(ready[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) return 2;
      std::thread([] {
        std::this_thread::sleep_for(std::chrono::milliseconds(700));
        ::kill(::getpid(), SIGKILL);
      }).detach();
      dsvm_prefetch(base + (kPages + kOthers) * kBig, kOthers * kBig, 0);  // waits on node 1
      return 3;
    });
  });
  ASSERT_EQ(::read(ready[0], &c, 1), 1);  // B holds its map
  nodes_[1]->Stall(std::chrono::milliseconds(2000));  // below the 3 s deadline
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // B's prefetch waits on node 1
  ASSERT_EQ(::write(go_a[1], &c, 1), 1);  // A's map: its copies take seconds
  a.join();
  b.join();
  for (int fd : {ready[0], ready[1], go[0], go[1], go_a[0], go_a[1], a_up[0], a_up[1]}) {
    ::close(fd);
  }
  EXPECT_EQ(a_rc, 0);
  EXPECT_EQ(b_rc, 200) << "B was to die of SIGKILL";
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_EQ(d.stats().clients_closed_after_gpu_copies, 1u);
    EXPECT_EQ(d.gpu_mapped_pages(), 0u) << "B's map went with it";
  });
  EXPECT_EQ(nodes_[0]->ReadU64(remote + 3 * kBig), 73u);
}

// Node 0's GPU holds the only current bytes of pages (a write map, then
// unmapped) when their write-back fails (here: RLIMIT_FSIZE below their
// offsets in the memfd, so the daemon's pwrite gets EFBIG).
// - A process on node 0 reads one: its fault is held, since the page
//   cannot be shown with its current bytes yet, and tried again.
// - Node 1 reads another: node 0 must not send its stale host bytes, and
//   must not lose the GPU's. It keeps the dirty copy and leaves the Fetch
//   until the directory's resend finds the store taking bytes again.
// The limit is lifted once node 0 has held the fault and left a Fetch:
// both readers then get the GPU's bytes, and node 0 runs on.
// Fails without: node 1 read the bytes from before the GPU's writes
// (before stop 13), or node 0 stopped and the page was lost (stop 13 to
// 25).
TEST_F(GpuMapDeathTest, AWriteBackTheStoreRefusesIsTriedAgainAndLosesNothing) {
  const proto::RegionReply r = Region("gstale", 16);
  // RLIMIT_FSIZE fails write(2) alone: the write-back must not go through
  // the daemon's mapping (with kmod, the pages stay in the memfd).
  map_for_copies_ = false;
  StartNodes({"emulated", "emulated"}, r);
  constexpr uint64_t kFirst = 4, kPages = 8;
  EXPECT_EQ(RunClient(0, "gstale", [&](uint8_t* base) {
              void* dev = nullptr;
              if (dsvm_gpu_map(base + kFirst * kPage, kPages * kPage, 0, DSVM_GPU_WRITE, &dev) != DSVM_OK) return 1;
              std::memset(dev, 0x77, kPages * kPage);
              return dsvm_gpu_unmap(base + kFirst * kPage, kPages * kPage) == DSVM_OK ? 0 : 2;
            }),
            0);
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  ::signal(SIGXFSZ, SIG_IGN);
  rlimit low = old;
  low.rlim_cur = kFirst * kPage;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &low), 0);
  int local_read = -1;
  std::thread local([&] {
    local_read = RunClient(0, "gstale", [&](uint8_t* base) {
      return base[(kFirst + 1) * kPage] == 0x77 ? 0 : 1;
    });
  });
  std::thread lift([&] {
    bool both = false;
    for (int i = 0; i < 2000 && !both; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      nodes_[0]->Sync([&](NodeDaemon& d) {
        both = d.stats().gpu_write_backs_refused != 0 && d.stats().faults_held_for_write_back != 0;
      });
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
  });
  std::vector<uint8_t> seen;
  const Status read = nodes_[1]->Access(r.base + kFirst * kPage, false, [&](std::span<uint8_t> b) {
    seen.assign(b.begin(), b.end());
  });
  lift.join();
  local.join();
  ::signal(SIGXFSZ, SIG_DFL);
  ASSERT_TRUE(read.ok()) << read.ToString();
  EXPECT_EQ(local_read, 0) << "node 0's reader, once the store took the bytes";
  EXPECT_EQ(seen, std::vector<uint8_t>(kPage, 0x77)) << "the GPU's bytes";
  nodes_[0]->Sync([&](NodeDaemon& d) {
    EXPECT_TRUE(d.fatal().ok()) << d.fatal().ToString();
    EXPECT_GE(d.stats().gpu_write_backs_refused, 1u);
    EXPECT_GE(d.stats().faults_held_for_write_back, 1u);
    EXPECT_EQ(d.stats().accesses_failed, 0u);
    EXPECT_GE(d.tier()->stats().write_backs_failed, 2u);
  });
  // The other pages are whole, from node 1 too.
  EXPECT_EQ(nodes_[1]->ReadU64(r.base + (kFirst + kPages - 1) * kPage), 0x7777777777777777ull);
}

}  // namespace
}  // namespace dsvm::testing
