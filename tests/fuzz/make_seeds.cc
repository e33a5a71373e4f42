// dsvm_fuzz_seed: writes valid encodings for the fuzz targets to start from.
//
//   dsvm_fuzz_seed OUT_DIR
//
// Creates OUT_DIR/frames (one frame of every message type, populated, and
// default where Decode accepts the defaults, for fuzz_decode_frame and
// fuzz_decode_header) and OUT_DIR/records
// (PageRecords, idle and busy, for fuzz_page_record). Each file is checked to
// decode before it is written, so a seed corpus is never silently invalid.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "proto/messages.h"
#include "proto/wire.h"

namespace dsvm::proto {
namespace {

namespace fs = std::filesystem;

bool WriteFile(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

template <size_t... I>
std::vector<Message> DefaultOfEveryType(std::index_sequence<I...>) {
  return {Message(std::in_place_index<I>)...};
}

// Populated messages: every field set, strings, blobs and lists non-empty.
// Blobs stay small so libFuzzer's default max_len (4096 or the largest seed)
// keeps inputs cheap.
std::vector<Message> PopulatedMessages() {
  constexpr PageAddr kPage = 0x7F0000201000ull;
  return {
      StatusReply{.code = static_cast<uint16_t>(StatusCode::kFailedPrecondition),
                  .message = "page is busy"},
      JoinRequest{.node = 7,
                  .address = "10.0.0.7:7070",
                  .host_memory_bytes = 64ull << 30,
                  .gpu_count = 2,
                  .transport_address = {1, 2, 3, 4, 5, 6, 7, 8}},
      JoinReply{.node = 7,
                .heartbeat_interval_ms = 250,
                .dead_after_ms = 2000,
                .shard = 1,
                .shard_count = 4,
                .window_base = 0x7F0000000000ull,
                .window_size = 1ull << 40},
      Heartbeat{.node = 7, .counters = {.read_faults = 3, .pages_fetched = 2, .bytes_fetched = 8192}},
      LeaveRequest{.node = 7},
      RegionCreate{.name = "matrix", .size = 1ull << 30, .page_size = 65536, .mode = 0660,
                   .token = "tok", .creds = {1, 1000, 100}},
      RegionOpen{.name = "matrix", .token = "tok", .creds = {1, 1001, 100}},
      RegionDelete{.name = "matrix", .creds = {1, 1000, 100}},
      RegionReply{.region = 3,
                  .base = 0x7F0000200000ull,
                  .size = 1ull << 30,
                  .page_size = 65536,
                  .name = "matrix"},
      PageQuery{.page = kPage},
      PageQueryReply{.page = kPage,
                     .state = PageState::kShared,
                     .owner = 3,
                     .version = 17,
                     .txn = 99,
                     .lost = 0,
                     .busy = 1,
                     .sharers = {3, 4, 5}},
      Acquire{.page = kPage,
              .node = 4,
              .kind = AccessKind::kWrite,
              .request_seq = 12,
              .last_txn = 98,
              .region = 3},
      Grant{.page = kPage,
            .txn = 100,
            .request_seq = 12,
            .state = PageState::kModified,
            .source = DataSource::kOwner,
            .status = 0,
            .version = 18,
            .stash_txn = 0},
      Fetch{.page = kPage,
            .txn = 100,
            .requester = 4,
            .next_state = PageState::kInvalid,
            .send_data = 1},
      Invalidate{.page = kPage, .txn = 100, .writer = 4},
      InvalidateAck{.page = kPage, .txn = 100, .node = 5},
      Done{.page = kPage, .txn = 100, .node = 4},
      Release{.page = kPage, .txn = 100},
      EvictReply{.page = kPage,
                 .request_seq = 13,
                 .status = static_cast<uint16_t>(StatusCode::kFailedPrecondition),
                 .txn = 106},
      PageData{.page = kPage,
               .txn = 100,
               .sender = 3,
               .version = 18,
               .data = std::vector<uint8_t>(64, 0xA5),
               .region = 1},
      PeerHello{.node = 3, .nonce = std::vector<uint8_t>(32, 0x42)},
      PeerChallenge{.nonce = std::vector<uint8_t>(32, 0x43), .proof = std::vector<uint8_t>(32, 0x44)},
      PeerProof{.proof = std::vector<uint8_t>(32, 0x45)},
      AuthHello{.nonce = std::vector<uint8_t>(32, 0x46)},
      AuthChallenge{.nonce = std::vector<uint8_t>(32, 0x47), .proof = {}},
      AuthProof{.proof = std::vector<uint8_t>(32, 0x48)},
      ClientHello{.abi = kClientAbi},
      ClientHelloReply{.node = 2, .window_base = 0x200000000000, .window_size = 1ull << 44},
      MapRegion{.base = 0x200000000000},
      UnmapRegion{.base = 0x200000000000},
      NodeStats{},
      NodeStatsReply{.node = 2, .clients = 1, .counters = {.local_hits = 9, .downgrades = 1}},
      Prefetch{.address = 0x200000000000, .length = 8192, .write = 0},
      Advise{.address = 0x200000000000, .length = 8192, .advice = Advice::kReadMostly, .node = 0},
      NodeList{.start_after = 1},
      NodeListReply{.nodes = {NodeEntry{2, 1, "127.0.0.1:7701", 1u << 30, 1, {.write_faults = 5}}}, .more = 0},
      RegionList{.start_after = 0},
      RegionPages{.name = "r1"},
      RegionPagesReply{.region = 1, .pages = 2, .touched = 2, .lost = 0, .in_flight = 0,
                       .nodes = {proto::NodePages{1, 1, 0}, proto::NodePages{2, 0, 1}}},
      RegionListReply{.regions = {RegionReply{1, 0x200000000000, 8192, 4096, "r1"}}, .more = 0},
      RegionDeleted{.region = 1, .base = 0x200000000000, .size = 8192},
      RegionCreated{.region = 2, .base = 0x200000200000, .size = 65536, .page_size = 65536,
                    .name = "r2"},
      RegionSnapshotDone{.regions = 1},
      GpuMap{.address = 0x200000000000, .length = 8192, .gpu = 0, .write = 1},
      GpuMapReply{.gpu = 0, .kind = DeviceKind::kEmulated, .arena = 0x7f0000000000,
                  .arena_bytes = 1 << 20, .offset = 4096, .length = 8192},
      GpuUnmap{.address = 0x200000000000, .length = 8192},
      GpuPrefetch{.address = 0x200000000000, .length = 8192, .gpu = 0, .write = 0},
      PageBatch{.sender = 2,
                .pages = {BatchedPage{0x200000000000, 3, 2, 4096, 1},
                          BatchedPage{0x200000001000, 4, 2, 4096, 1}}},
      PageRun{.count = 3, .page_stride = 4096, .seq_stride = 0,
              .first = Done{.page = 0x200000000000, .txn = 4, .node = 2}},
      ReadDirect{.page = 0x200000000000, .node = 2, .region = 1},
  };
}

std::vector<coordinator::PageRecord> Records() {
  coordinator::PageRecord idle;
  idle.page = 0x7F0000201000ull;
  idle.state = PageState::kShared;
  idle.owner = 3;
  idle.sharers = {{.node = 3, .since = 5}, {.node = 4, .since = 9}};
  idle.version = 4;
  idle.txn = 9;

  coordinator::PageRecord busy = idle;
  busy.state = PageState::kModified;
  busy.owner = 5;
  busy.sharers = {{.node = 5, .since = 10}};
  busy.txn = 10;
  busy.busy = 1;
  busy.tx.txn = 10;
  busy.tx.requester = 5;
  busy.tx.request_seq = 21;
  busy.tx.grant_state = PageState::kModified;
  busy.tx.source = DataSource::kOwner;
  busy.tx.fetch_from = 3;
  busy.tx.fetch_next = PageState::kInvalid;
  busy.tx.fetch_send_data = 1;
  busy.tx.prev_state = PageState::kShared;
  busy.tx.pending_acks = {4};
  busy.tx.last_send_ms = 1000;

  coordinator::PageRecord lost;
  lost.page = 0x7F0000202000ull;
  lost.lost = 1;
  lost.txn = 3;
  return {coordinator::PageRecord{}, idle, busy, lost};
}

int Main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const fs::path frames = fs::path(argv[1]) / "frames";
  const fs::path records = fs::path(argv[1]) / "records";
  std::error_code ec;
  fs::create_directories(frames, ec);
  if (!ec) fs::create_directories(records, ec);
  if (ec) {
    std::fprintf(stderr, "dsvm_fuzz_seed: %s: %s\n", argv[1], ec.message().c_str());
    return 1;
  }

  std::vector<Message> messages =
      DefaultOfEveryType(std::make_index_sequence<std::variant_size_v<Message>>());
  // A default RegionDeleted or RegionCreated names region 0, a default
  // GpuMap, GpuUnmap, GpuPrefetch or GpuMapReply an empty range, a default
  // PageBatch no page, a default Acquire or ReadDirect no region, a default
  // PageRun no messages, which Decode refuses
  // (their Validate()); their populated seeds stand for the types.
  std::erase_if(messages, [](const Message& m) {
    return std::holds_alternative<RegionDeleted>(m) || std::holds_alternative<RegionCreated>(m) ||
           std::holds_alternative<Acquire>(m) || std::holds_alternative<ReadDirect>(m) ||
           std::holds_alternative<GpuMap>(m) || std::holds_alternative<GpuUnmap>(m) ||
           std::holds_alternative<GpuPrefetch>(m) ||
           std::holds_alternative<GpuMapReply>(m) || std::holds_alternative<PageBatch>(m) ||
           std::holds_alternative<PageRun>(m);
  });
  for (Message& m : PopulatedMessages()) messages.push_back(std::move(m));
  size_t written = 0;
  for (size_t i = 0; i < messages.size(); ++i) {
    std::vector<uint8_t> bytes = Encode(messages[i], 1000 + i);
    if (Result<Frame> check = Decode(bytes); !check.ok()) {
      std::fprintf(stderr, "dsvm_fuzz_seed: seed %zu does not decode: %s\n", i,
                   check.status().ToString().c_str());
      return 1;
    }
    std::string name = std::string(TypeName(TypeOf(messages[i]))) + "-" + std::to_string(i);
    if (!WriteFile(frames / name, bytes)) {
      std::fprintf(stderr, "dsvm_fuzz_seed: cannot write %s\n", (frames / name).c_str());
      return 1;
    }
    ++written;
  }

  std::vector<coordinator::PageRecord> recs = Records();
  for (size_t i = 0; i < recs.size(); ++i) {
    std::vector<uint8_t> bytes = EncodeFields(recs[i]);
    coordinator::PageRecord check;
    if (Status s = DecodeFields(bytes, &check); !s.ok()) {
      std::fprintf(stderr, "dsvm_fuzz_seed: record %zu does not decode: %s\n", i,
                   s.ToString().c_str());
      return 1;
    }
    if (!WriteFile(records / ("record-" + std::to_string(i)), bytes)) {
      std::fprintf(stderr, "dsvm_fuzz_seed: cannot write records\n");
      return 1;
    }
    ++written;
  }
  std::printf("dsvm_fuzz_seed: wrote %zu seeds under %s\n", written, argv[1]);
  return 0;
}

}  // namespace
}  // namespace dsvm::proto

int main(int argc, char** argv) { return dsvm::proto::Main(argc, argv); }
