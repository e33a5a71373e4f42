// dsvm-netns-client: one libdsvm client process acting on a region, run by
// the netns tests inside a node's network namespace.
//
//   dsvm-netns-client --socket PATH COMMAND ARGS...
//
//   create NAME SIZE                 creates region NAME (4 KiB pages)
//   write NAME OFFSET VALUE          stores the 8-byte VALUE at OFFSET
//   read NAME OFFSET                 prints the 8-byte value at OFFSET
//   fill NAME OFFSET LENGTH SEED     writes a byte pattern made from SEED
//   check NAME OFFSET LENGTH SEED    checks that pattern is there
//   barrier-init NAME OFFSET PARTIES
//   lock-increment NAME N            N increments of the counter at page 1
//                                    under the dsvm lock at page 0, after
//                                    the start barrier at page 2
//   sequence NAME STEP...            steps in one process, in order:
//                                    r:OFFSET (prints the value), w:OFFSET:VALUE,
//                                    sleep:MS
//   stats                            prints the node's counters, one
//                                    "name value" a line
//   random NAME INDEX PARTIES SEED OPS
//                                    random reads and writes of 8-byte slots,
//                                    each checked (see Random below)
//
// Numbers are decimal or 0x hex. Exit codes: 0 done; 1 a check failed (what
// was expected and what was seen on stderr); 2 usage; 3 a dsvm call failed
// (dsvm_last_error on stderr).
#include <dsvm/dsvm.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr size_t kPage = 4096;
constexpr int kCheckFailed = 1;
constexpr int kUsage = 2;
constexpr int kDsvmFailed = 3;

[[noreturn]] void Exit(int code, const char* fmt, ...) {
  std::fprintf(stderr, "dsvm-netns-client[%d]: ", ::getpid());
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  // Leaves the regions and the daemon connection cleanly even on failure.
  dsvm_finalize();
  std::exit(code);
}

void Check(int rc, const char* what) {
  if (rc < 0) Exit(kDsvmFailed, "%s: %s (%s)", what, dsvm_strerror(rc), dsvm_last_error());
}

uint64_t Number(const char* s) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(s, &end, 0);
  if (errno != 0 || end == s || *end != '\0' || s[0] == '-')
    Exit(kUsage, "'%s' is not a number", s);
  return v;
}

uint64_t Load(const uint8_t* p) {
  return __atomic_load_n(reinterpret_cast<const uint64_t*>(p), __ATOMIC_RELAXED);
}
void Store(uint8_t* p, uint64_t v) {
  __atomic_store_n(reinterpret_cast<uint64_t*>(p), v, __ATOMIC_RELAXED);
}

struct Region {
  uint8_t* base = nullptr;
  size_t size = 0;
};

Region Open(const char* name) {
  Region r;
  void* addr = nullptr;
  Check(dsvm_region_open(name, &addr, &r.size), "dsvm_region_open");
  r.base = static_cast<uint8_t*>(addr);
  return r;
}

// An 8-byte-aligned offset with `length` bytes inside the region.
uint8_t* At(const Region& r, uint64_t offset, uint64_t length = 8) {
  if (offset % 8 != 0 || offset > r.size || length > r.size - offset) {
    Exit(kUsage,
         "offset %" PRIu64 " (+%" PRIu64 ") is not aligned or outside the region of %zu bytes",
         offset, length, r.size);
  }
  return r.base + offset;
}

// The byte pattern of fill/check: every byte depends on its offset and the seed.
uint8_t PatternByte(uint64_t offset, uint64_t seed) {
  uint64_t x = (offset >> 3) * 0x9E3779B97F4A7C15ull + seed;
  x ^= x >> 29;
  return static_cast<uint8_t>(x >> (8 * (offset & 7)));
}

// Spins for a few microseconds outside the lock, so the other node gets it
// and the pages move often (as LockedIncrementsFromTwoNodesAreExact does).
void Pause() {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(5);
  while (std::chrono::steady_clock::now() < until) {
  }
}

// --- random ------------------------------------------------------------------
//
// Layout: page 0 holds the barrier (barrier-init NAME 0 PARTIES first);
// page 1 + w holds writer w's progress counter; the pages after those hold
// kSlotsPerPage 8-byte slots each, at their start. Slot s belongs to writer
// s % PARTIES, so every data page holds slots of several writers and pages
// move between nodes on nearly every write (false sharing, on purpose); few
// slots make every slot written and read many times.
//
// Writer w's operations come from its own generator, seeded by (SEED, w), so
// any process can replay any writer's writes. Its op i, when a write, stores
// Tag(w, i + 1) in one of w's slots (values a writer stores only grow), then
// i + 1 in its progress counter.
//
// Checked on every read of slot s of writer w, against what this process
// saw before and against w's replayed writes:
//  - the value carries w's tag (nobody else wrote there);
//  - its sequence number never goes backwards (coherence of one location);
//  - it is no older than w's last write to s before the progress counter
//    value this process read just before: w wrote the slot, then the
//    counter, on another page, so seeing the counter but an older slot
//    would break sequential consistency across pages (a stale copy kept
//    after a newer write elsewhere was seen);
//  - a slot of this process holds exactly what it last wrote.
// After a barrier every process checks that every slot holds its writer's
// last value.
constexpr uint64_t kSlotsPerPage = 8;
constexpr int kSeqBits = 40;
constexpr uint64_t kSeqMask = (uint64_t{1} << kSeqBits) - 1;

uint64_t Tag(uint64_t writer, uint64_t seq) { return (writer + 1) << kSeqBits | seq; }

struct RandomOp {
  bool write;
  uint64_t slot;
};

class Writer {
 public:
  Writer(uint64_t seed, uint64_t index, uint64_t parties, uint64_t slots)
      : rng_(Seed(seed, index)), index_(index), parties_(parties), slots_(slots) {}

  // mt19937_64 takes its seed sequence by reference.
  static std::mt19937_64 Seed(uint64_t seed, uint64_t index) {
    std::seed_seq seq{seed, seed >> 32, index};
    return std::mt19937_64(seq);
  }

  RandomOp Next() {
    RandomOp op;
    op.write = rng_() % 3 == 0;
    if (op.write) {
      const uint64_t mine =
          (slots_ - index_ + parties_ - 1) / parties_;  // slots s ≡ index (mod parties)
      op.slot = index_ + parties_ * (rng_() % mine);
    } else {
      op.slot = rng_() % slots_;
    }
    return op;
  }

 private:
  std::mt19937_64 rng_;
  uint64_t index_, parties_, slots_;
};

int Random(const char* name, uint64_t index, uint64_t parties, uint64_t seed, uint64_t ops) {
  if (parties == 0 || index >= parties || ops == 0 || ops > kSeqMask) {
    Exit(kUsage, "random: bad INDEX/PARTIES/OPS");
  }
  Region r = Open(name);
  if (r.size / kPage < 2 + parties)
    Exit(kUsage, "random: the region needs at least %" PRIu64 " pages", 2 + parties);
  auto* barrier = reinterpret_cast<dsvm_barrier_t*>(r.base);
  auto progress = [&](uint64_t w) { return r.base + (1 + w) * kPage; };
  const uint64_t first_data_page = 1 + parties;
  const uint64_t nslots = (r.size / kPage - first_data_page) * kSlotsPerPage;
  if (nslots < parties) Exit(kUsage, "random: fewer slots than parties");
  auto page_of = [&](uint64_t s) { return first_data_page + s / kSlotsPerPage; };
  auto slot = [&](uint64_t s) { return r.base + page_of(s) * kPage + 8 * (s % kSlotsPerPage); };

  // Every writer's writes, replayed: for each slot, the ops that wrote it
  // (only its owner writes it), in order.
  std::vector<std::vector<uint64_t>> writes_of(nslots);
  for (uint64_t w = 0; w < parties; ++w) {
    Writer replay(seed, w, parties, nslots);
    for (uint64_t i = 0; i < ops; ++i) {
      const RandomOp op = replay.Next();
      if (op.write) writes_of[op.slot].push_back(i);
    }
  }
  // The sequence number slot s holds once its owner's ops before `done` are
  // all visible.
  auto at_least = [&](uint64_t s, uint64_t done) -> uint64_t {
    const auto& v = writes_of[s];
    auto it = std::lower_bound(v.begin(), v.end(), done);
    return it == v.begin() ? 0 : *(it - 1) + 1;
  };

  // Start together, so the processes contend.
  Check(dsvm_barrier_wait(barrier), "dsvm_barrier_wait (start)");

  std::vector<uint64_t> seen(nslots, 0);  // highest sequence number seen per slot
  Writer me(seed, index, parties, nslots);
  uint64_t reads = 0, writes = 0, foreign = 0, advanced = 0;
  // The longest single access: a fault that waits while other nodes run.
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::duration longest{};
  auto timed = [&](auto access) {
    const Clock::time_point t0 = Clock::now();
    access();
    longest = std::max(longest, Clock::now() - t0);
  };
  for (uint64_t i = 0; i < ops; ++i) {
    const RandomOp op = me.Next();
    const uint64_t owner = op.slot % parties;
    if (op.write) {
      timed([&] { Store(slot(op.slot), Tag(index, i + 1)); });
      timed([&] { Store(progress(index), i + 1); });
      seen[op.slot] = i + 1;
      ++writes;
      continue;
    }
    ++reads;
    uint64_t done = 0, v = 0;
    if (owner != index) timed([&] { done = Load(progress(owner)); });
    timed([&] { v = Load(slot(op.slot)); });
    const uint64_t seq = v & kSeqMask;
    if (v != 0 && (v >> kSeqBits) != owner + 1) {
      Exit(kCheckFailed,
           "op %" PRIu64 ": slot %" PRIu64 " (page %" PRIu64 ") holds 0x%" PRIx64
           ", not a value of its writer %" PRIu64,
           i, op.slot, page_of(op.slot), v, owner);
    }
    if (seq < seen[op.slot]) {
      Exit(kCheckFailed,
           "op %" PRIu64 ": slot %" PRIu64 " (page %" PRIu64 ", writer %" PRIu64
           ") went backwards: sequence %" PRIu64 " after %" PRIu64,
           i, op.slot, page_of(op.slot), owner, seq, seen[op.slot]);
    }
    if (owner != index && seq < at_least(op.slot, done)) {
      Exit(kCheckFailed,
           "op %" PRIu64 ": slot %" PRIu64 " (page %" PRIu64 ", writer %" PRIu64
           ") holds sequence %" PRIu64 ", but the writer's progress counter (page %" PRIu64
           ") read just before said %" PRIu64 " ops done, by when it had written sequence %" PRIu64
           " there: a stale copy",
           i, op.slot, page_of(op.slot), owner, seq, 1 + owner, done, at_least(op.slot, done));
    }
    if (owner == index && seq != seen[op.slot]) {
      Exit(kCheckFailed,
           "op %" PRIu64 ": own slot %" PRIu64 " holds sequence %" PRIu64
           ", this process wrote %" PRIu64,
           i, op.slot, seq, seen[op.slot]);
    }
    if (owner != index && seq != 0) ++foreign;              // another node's write
    if (owner != index && seq > seen[op.slot]) ++advanced;  // a newer one than seen before
    seen[op.slot] = seq;
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  // Everyone's writes are done; every slot must hold its writer's last value.
  Check(dsvm_barrier_wait(barrier), "dsvm_barrier_wait (end)");
  uint64_t wrong = 0;
  for (uint64_t s = 0; s < nslots; ++s) {
    const uint64_t v = Load(slot(s));
    const uint64_t expect = writes_of[s].empty() ? 0 : Tag(s % parties, writes_of[s].back() + 1);
    if (v != expect && ++wrong <= 5) {
      std::fprintf(stderr,
                   "dsvm-netns-client[%d]: final: slot %" PRIu64 " (page %" PRIu64
                   ", writer %" PRIu64 ") holds 0x%" PRIx64 ", expected 0x%" PRIx64 "\n",
                   ::getpid(), s, page_of(s), s % parties, v, expect);
    }
  }
  // Nobody leaves before everyone has checked, so the end of the run is
  // symmetric (the daemons would serve the pages anyway).
  Check(dsvm_barrier_wait(barrier), "dsvm_barrier_wait (after check)");
  if (wrong != 0)
    Exit(kCheckFailed, "final: %" PRIu64 " of %" PRIu64 " slots wrong", wrong, nslots);
  // How much the checks had to bite on: reads that saw other writers'
  // values, and reads that saw one newer than this process had seen.
  std::printf("reads %" PRIu64 " writes %" PRIu64 " foreign %" PRIu64 " advanced %" PRIu64
              " slots %" PRIu64 " seconds %.3f longest_access_ms %.3f\n",
              reads, writes, foreign, advanced, nslots, seconds,
              std::chrono::duration<double, std::milli>(longest).count());
  return 0;
}

int Run(int argc, char** argv) {
  if (argc < 1) Exit(kUsage, "no command");
  const std::string cmd = argv[0];
  auto need = [&](int n) {
    if (argc != n + 1) Exit(kUsage, "%s takes %d arguments", cmd.c_str(), n);
  };
  if (cmd == "create") {
    need(2);
    void* addr = nullptr;
    Check(dsvm_region_create(argv[1], Number(argv[2]), DSVM_PAGE_SIZE_4K, &addr),
          "dsvm_region_create");
    std::printf("%p\n", addr);
    return 0;
  }
  if (cmd == "write") {
    need(3);
    Region r = Open(argv[1]);
    Store(At(r, Number(argv[2])), Number(argv[3]));
    return 0;
  }
  if (cmd == "read") {
    need(2);
    Region r = Open(argv[1]);
    std::printf("%" PRIu64 "\n", Load(At(r, Number(argv[2]))));
    return 0;
  }
  if (cmd == "fill" || cmd == "check") {
    need(4);
    Region r = Open(argv[1]);
    const uint64_t offset = Number(argv[2]), length = Number(argv[3]), seed = Number(argv[4]);
    uint8_t* p = At(r, offset, length);
    for (uint64_t i = 0; i < length; ++i) {
      const uint8_t want = PatternByte(offset + i, seed);
      if (cmd == "fill") {
        p[i] = want;
      } else if (p[i] != want) {
        Exit(kCheckFailed, "byte at offset %" PRIu64 " is 0x%02x, expected 0x%02x", offset + i,
             p[i], want);
      }
    }
    return 0;
  }
  if (cmd == "barrier-init") {
    need(3);
    Region r = Open(argv[1]);
    const uint64_t parties = Number(argv[3]);
    if (parties > UINT32_MAX) Exit(kUsage, "too many parties");
    Check(dsvm_barrier_init(reinterpret_cast<dsvm_barrier_t*>(At(r, Number(argv[2]), 16)),
                            static_cast<uint32_t>(parties)),
          "dsvm_barrier_init");
    return 0;
  }
  if (cmd == "sequence") {
    if (argc < 3) Exit(kUsage, "sequence takes a region and steps");
    Region r = Open(argv[1]);
    for (int i = 2; i < argc; ++i) {
      std::string step = argv[i];
      const size_t colon = step.find(':');
      const std::string verb = step.substr(0, colon);
      std::string rest = colon == std::string::npos ? "" : step.substr(colon + 1);
      if (verb == "sleep") {
        ::usleep(static_cast<useconds_t>(Number(rest.c_str()) * 1000));
      } else if (verb == "r") {
        std::printf("%" PRIu64 "\n", Load(At(r, Number(rest.c_str()))));
      } else if (verb == "w" && rest.find(':') != std::string::npos) {
        const std::string value = rest.substr(rest.find(':') + 1);
        rest.resize(rest.find(':'));
        Store(At(r, Number(rest.c_str())), Number(value.c_str()));
      } else {
        Exit(kUsage, "bad step '%s'", step.c_str());
      }
    }
    return 0;
  }
  if (cmd == "lock-increment") {
    need(2);
    Region r = Open(argv[1]);
    auto* lock = reinterpret_cast<dsvm_lock_t*>(At(r, 0));
    uint8_t* counter = At(r, kPage);
    auto* start = reinterpret_cast<dsvm_barrier_t*>(At(r, 2 * kPage, sizeof(dsvm_barrier_t)));
    const uint64_t n = Number(argv[2]);
    // Start together: a process started a few milliseconds before the
    // others would otherwise be done before they begin.
    Check(dsvm_barrier_wait(start), "dsvm_barrier_wait (start)");
    for (uint64_t i = 0; i < n; ++i) {
      Check(dsvm_lock_acquire(lock), "dsvm_lock_acquire");
      // A plain load and store: only the lock keeps increments from being lost.
      Store(counter, Load(counter) + 1);
      Check(dsvm_lock_release(lock), "dsvm_lock_release");
      Pause();
    }
    return 0;
  }
  if (cmd == "stats") {
    need(0);
    dsvm_node_stats_t st;
    Check(dsvm_stats(&st), "dsvm_stats");
    std::printf("node %" PRIu32 "\nclients %" PRIu32 "\nread_faults %" PRIu64
                "\nwrite_faults %" PRIu64 "\nlocal_hits %" PRIu64 "\npages_fetched %" PRIu64
                "\npages_sent %" PRIu64 "\nbytes_fetched %" PRIu64 "\nbytes_sent %" PRIu64
                "\ninvalidations %" PRIu64 "\ndowngrades %" PRIu64 "\n",
                st.node, st.clients, st.read_faults, st.write_faults, st.local_hits,
                st.pages_fetched, st.pages_sent, st.bytes_fetched, st.bytes_sent, st.invalidations,
                st.downgrades);
    return 0;
  }
  if (cmd == "random") {
    need(5);
    return Random(argv[1], Number(argv[2]), Number(argv[3]), Number(argv[4]), Number(argv[5]));
  }
  Exit(kUsage, "unknown command '%s'", cmd.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (argc < 4 || std::strcmp(argv[1], "--socket") != 0) {
    std::fprintf(stderr,
                 "usage: dsvm-netns-client --socket PATH COMMAND ARGS... (see the source)\n");
    return kUsage;
  }
  Check(dsvm_init(argv[2]), "dsvm_init");
  const int rc = Run(argc - 3, argv + 3);
  Check(dsvm_finalize(), "dsvm_finalize");
  return rc;
}
