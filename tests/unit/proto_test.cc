// Unit tests for the wire codec (proto/messages.h, proto/wire.h), the stored
// PageRecord encoding (coordinator/directory/page_directory.h) and
// Status/Result (proto/status.h).
//
// Refusals are checked for their StatusCode as DecodeHeader documents it:
// kInvalidArgument for an unknown type or version (a peer we cannot talk to),
// kCorruption for everything else (bytes that fail validation).
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>


#include <cstdint>
#include <cstring>
#include <algorithm>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <variant>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "proto/framed_socket.h"
#include "proto/messages.h"
#include "proto/status.h"
#include "proto/wire.h"

namespace dsvm::proto {
namespace {

using Bytes = std::vector<uint8_t>;

// ---------------------------------------------------------------------------
// Helpers.

// Records every field that a struct's Visit() lists, one string per field, so
// two values can be compared field by field without an operator== per type.
// Long strings and blobs are recorded as size and FNV-1a hash to keep failure
// output readable.
class FieldRecorder {
 public:
  void U8(uint8_t v) { Add("u8", v); }
  void U16(uint16_t v) { Add("u16", v); }
  void U32(uint32_t v) { Add("u32", v); }
  void U64(uint64_t v) { Add("u64", v); }
  void Flag(uint8_t v) { Add("flag", v); }
  void Code(uint16_t v) { Add("code", v); }
  template <typename E>
  void Enum(E v, uint8_t) {
    Add("enum", static_cast<uint8_t>(v));
  }
  void Str(const std::string& s, uint32_t) { fields_.push_back("str:" + Summary(s)); }
  void Blob(const Bytes& b, uint32_t) {
    fields_.push_back("blob:" + Summary(std::string(b.begin(), b.end())));
  }
  void U32List(const std::vector<uint32_t>& l, uint32_t) {
    std::string s = "u32list:" + std::to_string(l.size()) + ":";
    for (uint32_t v : l) s += std::to_string(v) + ",";
    fields_.push_back(s);
  }
  template <typename T>
  void List(const std::vector<T>& l, uint32_t) {
    std::string s = "list:" + std::to_string(l.size()) + ":";
    for (T e : l) {
      FieldRecorder inner;
      e.Visit(inner);
      s += "{";
      for (const auto& f : inner.fields_) s += f + ";";
      s += "}";
    }
    fields_.push_back(s);
  }

  const std::vector<std::string>& fields() const { return fields_; }

 private:
  void Add(const char* kind, uint64_t v) { fields_.push_back(kind + (":" + std::to_string(v))); }
  static std::string Summary(const std::string& s) {
    if (s.size() <= 64) return s;
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return "<" + std::to_string(s.size()) + " bytes, fnv " + std::to_string(h) + ">";
  }

  std::vector<std::string> fields_;
};

template <typename T>
std::vector<std::string> FieldsOf(T value) {
  FieldRecorder r;
  value.Visit(r);
  return r.fields();
}

std::vector<std::string> FieldsOf(const Message& m) {
  return std::visit([](const auto& x) { return FieldsOf(x); }, m);
}

// A default-constructed message of the same type as `m`.
Message DefaultLike(const Message& m) {
  return std::visit([](const auto& x) { return Message(std::decay_t<decltype(x)>{}); }, m);
}

uint64_t ReadLe(const Bytes& b, size_t at, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t{b.at(at + i)} << (8 * i);
  return v;
}

void WriteLe(Bytes* b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b->at(at + i) = static_cast<uint8_t>(v >> (8 * i));
}

void AppendLe(Bytes* b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// Rewrites a frame's header payload_length to match the bytes present.
void FixPayloadLength(Bytes* frame) { WriteLe(frame, 8, frame->size() - kHeaderSize, 4); }

struct RawHeader {
  uint32_t magic = kMagic;
  uint16_t version = kWireVersion;
  uint16_t type = static_cast<uint16_t>(MessageType::kLeaveRequest);
  uint32_t payload_length = 4;
  uint32_t reserved = 0;
  uint64_t request_id = 1;
};

Bytes HeaderBytes(const RawHeader& h) {
  Bytes b;
  AppendLe(&b, h.magic, 4);
  AppendLe(&b, h.version, 2);
  AppendLe(&b, h.type, 2);
  AppendLe(&b, h.payload_length, 4);
  AppendLe(&b, h.reserved, 4);
  AppendLe(&b, h.request_id, 8);
  return b;
}

// A frame of `type` around a hand-written payload, with a correct length.
Bytes FrameOf(MessageType type, const Bytes& payload, uint64_t request_id = 1) {
  Bytes b = HeaderBytes({.type = static_cast<uint16_t>(type),
                         .payload_length = static_cast<uint32_t>(payload.size()),
                         .request_id = request_id});
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

// Decode must refuse `bytes` with `code` and a message containing `why`.
void ExpectRefused(const Bytes& bytes, StatusCode code, std::string_view why) {
  Result<Frame> r = Decode(bytes);
  ASSERT_FALSE(r.ok()) << "accepted a frame that should be refused (" << why << ")";
  EXPECT_EQ(r.status().code(), code) << r.status().ToString();
  EXPECT_NE(r.status().message().find(why), std::string::npos)
      << "message \"" << r.status().message() << "\" does not mention \"" << why << "\"";
}

// One message of every type, every field different from its default, and
// values whose high bytes are set so byte order mistakes show.
NodeCounters SampleCounters(uint64_t seed) {
  const uint64_t high = 0x8000000000000000ull + seed * 100;
  return NodeCounters{.read_faults = high + 1,
                      .write_faults = high + 2,
                      .local_hits = high + 3,
                      .pages_fetched = high + 4,
                      .pages_sent = high + 5,
                      .bytes_fetched = high + 6,
                      .bytes_sent = high + 7,
                      .invalidations = high + 8,
                      .downgrades = high + 9,
                      .prefetched_pages = high + 10,
                      .gpu_maps = high + 11,
                      .gpu_zero_copy_maps = high + 12,
                      .gpu_maps_lost = high + 13,
                      .gpu_placed_pages = high + 14,
                      .gpu_pages_in = high + 15,
                      .gpu_pages_out = high + 16,
                      .fences = high + 17,
                      .fenced_accesses = high + 18,
                      .direct_reads = high + 19,
                      .direct_reads_served = high + 20,
                      .gpu_direct_pages_in = high + 21,
                      .gpu_direct_pages_out = high + 22};
}

std::vector<Message> SampleMessages() {
  constexpr PageAddr kPage = 0xFEDCBA9876543000ull;
  constexpr size_t kNonceBytes = 32;
  Bytes page_bytes(4096);
  for (size_t i = 0; i < page_bytes.size(); ++i) page_bytes[i] = static_cast<uint8_t>(i * 7 + 1);
  return {
      StatusReply{.code = static_cast<uint16_t>(StatusCode::kFailedPrecondition),
                  .message = "page 0x1000 is busy"},
      JoinRequest{.node = 0x80000007,
                  .address = "10.0.0.7:7070",
                  .host_memory_bytes = 64ull << 30,
                  .gpu_count = 2,
                  .transport_address = {0x01, 0x00, 0xFF, 0x7E},
                  .resume = 1},
      JoinReply{.node = 7,
                .heartbeat_interval_ms = 250,
                .dead_after_ms = 2000,
                .shard = 3,
                .shard_count = 8,
                .window_base = 0x7F0000000000ull,
                .window_size = 1ull << 40},
      Heartbeat{.node = 0x01020304, .counters = SampleCounters(1)},
      LeaveRequest{.node = 0xFFFFFFFF},
      RegionCreate{.name = "matrix-a",
                   .size = (1ull << 33) + 5,
                   .page_size = 65536,
                   .mode = 0644,
                   .token = "t0ken",
                   .creds = {1, 0x80000001, 0x80000002}},
      RegionOpen{.name = "matrix-b", .token = "sesame", .creds = {1, 0x80000003, 0x80000004}},
      RegionDelete{.name = "matrix-c", .creds = {1, 0x80000005, 0x80000006}},
      RegionReply{.region = 0x8000000000000042ull,
                  .base = 0x7F0000200000ull,
                  .size = 1ull << 21,
                  .page_size = 4096,
                  .name = "matrix-a"},
      PageQuery{.page = kPage},
      PageQueryReply{.page = kPage,
                     .state = PageState::kModified,
                     .owner = 3,
                     .version = 0x8000000000000011ull,
                     .txn = 99,
                     .lost = 1,
                     .busy = 1,
                     .sharers = {3, 0x80000004, 5}},
      Acquire{.page = kPage,
              .node = 4,
              .kind = AccessKind::kUpgrade,
              .request_seq = 0x8000000000000001ull,
              .last_txn = 98,
              .target = 0x80000007,
              .region = 0x8000000000000009ull},
      Grant{.page = kPage,
            .txn = 100,
            .request_seq = 1234,
            .state = PageState::kModified,
            .source = DataSource::kStash,
            .status = static_cast<uint16_t>(StatusCode::kDataLoss),
            .version = 18,
            .stash_txn = 97},
      Fetch{.page = kPage,
            .txn = 101,
            .requester = 5,
            .next_state = PageState::kInvalid,
            .send_data = 0},
      Invalidate{.page = kPage, .txn = 102, .writer = 5},
      InvalidateAck{.page = kPage, .txn = 102, .node = 6},
      Done{.page = kPage, .txn = 103, .node = 7},
      Release{.page = kPage, .txn = 104},
      EvictReply{.page = kPage,
                 .request_seq = 555,
                 .status = static_cast<uint16_t>(StatusCode::kFailedPrecondition),
                 .txn = 106},
      PageData{.page = kPage, .txn = 105, .sender = 8, .version = 19, .data = page_bytes,
               .region = 0x800000000000000Dull},
      PeerHello{.node = 9, .nonce = std::vector<uint8_t>(kNonceBytes, 0xC3)},
      PeerChallenge{.nonce = std::vector<uint8_t>(kNonceBytes, 0xC4),
                    .proof = std::vector<uint8_t>(kNonceBytes, 0xC5)},
      PeerProof{.proof = std::vector<uint8_t>(kNonceBytes, 0xC6)},
      AuthHello{.nonce = std::vector<uint8_t>(kNonceBytes, 0xD3)},
      AuthChallenge{.nonce = std::vector<uint8_t>(kNonceBytes, 0xD4),
                    .proof = std::vector<uint8_t>(kNonceBytes, 0xD5)},
      AuthProof{.proof = std::vector<uint8_t>(kNonceBytes, 0xD6)},
      ClientHello{.abi = kClientAbi + 1},
      ClientHelloReply{.node = 3, .window_base = 0x200000000000, .window_size = 1ull << 44},
      MapRegion{.base = 0x200000200000},
      UnmapRegion{.base = 0x200000400000},
      NodeStats{},
      NodeStatsReply{.node = 0x80000003, .clients = 17, .counters = SampleCounters(3)},
      Prefetch{.address = 0x200000403000, .length = 0x8000000000000000ull + 4096, .write = 1},
      Advise{.address = 0x200000405000,
             .length = 0x8000000000001000ull,
             .advice = Advice::kReadMostly,
             .node = 0x80000002},
      NodeList{.start_after = 3},
      NodeListReply{.nodes = {NodeEntry{4, 1, "10.0.0.4:7701", 1u << 30, 2, SampleCounters(2)},
                              NodeEntry{5, 0, std::string(kMaxAddressLength, 'h'), 7, 0, {}}},
                    .more = 1},
      RegionList{.start_after = 11},
      RegionPages{.name = "matrix-d"},
      RegionPagesReply{.region = 0x8000000000000007ull,
                       .pages = 1ull << 40,
                       .touched = 77,
                       .lost = 3,
                       .in_flight = 2,
                       .nodes = {NodePages{4, 10, 20}, NodePages{0x80000005, 0, 7}}},
      RegionListReply{.regions = {RegionReply{12, 0x200000000000, 4096, 4096, "r12"}},
                      .more = 1},
      RegionDeleted{.region = 0x8000000000000043ull,
                    .base = 0x8000000000200000ull,
                    .size = 0x7F00000000003000ull},
      RegionWatch{},
      RegionCreated{.region = 0x8000000000000044ull,
                    .base = 0x8000000000400000ull,
                    .size = 0x7F00000000030000ull,
                    .page_size = 65536,
                    .name = "matrix-e"},
      RegionSnapshotDone{.regions = 0x8000000000000045ull, .next_region = 0x8000000000000046ull},
      GpuMap{.address = 0x8000000000600000ull, .length = 0x7F00000000005000ull, .gpu = 0x80000001,
             .write = 1},
      GpuMapReply{.gpu = 0x80000002,
                  .kind = DeviceKind::kCuda,
                  .arena = 0x8000000000800000ull,
                  .arena_bytes = 0x8000000000000000ull,
                  .offset = 0x7000000000000000ull,
                  .length = 0x0F00000000001000ull,
                  .ipc_handle = std::vector<uint8_t>(kCudaIpcHandleSize, 0xE7)},
      GpuUnmap{.address = 0x8000000000700000ull, .length = 0x7F00000000006000ull},
      GpuPrefetch{.address = 0x8000000000900000ull, .length = 0x7F00000000007000ull,
                  .gpu = 0x80000003, .write = 1},
      PageBatch{.sender = 0x80000004,
                .pages = {BatchedPage{kPage, 0x8000000000000107ull, 0x8000000000000021ull, 4096,
                                      0x800000000000000Eull},
                          BatchedPage{kPage + 0x10000, 108, 22, 65536, 5}}},
      PageRun{.count = 0x300,
              .page_stride = 0x10000,
              .seq_stride = 1,
              .first = Acquire{.page = kPage,
                               .node = 0x80000008,
                               .kind = AccessKind::kWrite,
                               .request_seq = 0x8000000000000002ull,
                               .last_txn = 0x8000000000000003ull,
                               .target = 0x80000009,
                               .region = 0x800000000000000Aull}},
      ReadDirect{.page = kPage, .node = 0x8000000B, .region = 0x800000000000000Cull},
  };
}

template <typename T>
Bytes EncodeSample() {
  for (const Message& m : SampleMessages()) {
    if (std::holds_alternative<T>(m)) return Encode(m, 1);
  }
  ADD_FAILURE() << "no sample of the requested type";
  return {};
}

// ---------------------------------------------------------------------------
// Samples themselves: every type, every field away from its default, so a
// decoder that drops a field cannot pass the round trip by accident.

TEST(ProtoSamplesTest, CoverEveryMessageType) {
  std::set<size_t> seen;
  for (const Message& m : SampleMessages()) seen.insert(m.index());
  EXPECT_EQ(seen.size(), std::variant_size_v<Message>);
}

TEST(ProtoSamplesTest, EveryFieldDiffersFromItsDefault) {
  for (const Message& m : SampleMessages()) {
    std::vector<std::string> sample = FieldsOf(m);
    std::vector<std::string> defaults = FieldsOf(DefaultLike(m));
    ASSERT_EQ(sample.size(), defaults.size());
    // A PageRun's field 0 names the type of its first message, which its
    // default shares (both Acquire): the rest must differ.
    const size_t from = std::holds_alternative<PageRun>(m) ? 1 : 0;
    for (size_t i = from; i < sample.size(); ++i) {
      EXPECT_NE(sample[i], defaults[i]) << TypeName(TypeOf(m)) << " field " << i;
    }
  }
}

// ---------------------------------------------------------------------------
// Round trips.

class ProtoRoundTripTest : public ::testing::TestWithParam<size_t> {};

TEST_P(ProtoRoundTripTest, DecodeReturnsEveryField) {
  const Message m = SampleMessages().at(GetParam());
  const uint64_t request_id = 0x0123456789ABCDEFull + GetParam();
  Bytes bytes = Encode(m, request_id);

  Result<Frame> r = Decode(bytes);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->header.magic, kMagic);
  EXPECT_EQ(r->header.version, kWireVersion);
  EXPECT_EQ(r->header.type, TypeOf(m));
  EXPECT_EQ(r->header.payload_length, bytes.size() - kHeaderSize);
  EXPECT_EQ(r->header.request_id, request_id);
  EXPECT_EQ(r->message.index(), m.index());
  EXPECT_EQ(FieldsOf(r->message), FieldsOf(m));
  EXPECT_EQ(Encode(r->message, request_id), bytes);
}

TEST_P(ProtoRoundTripTest, HeaderThenPayloadAgreesWithDecode) {
  const Message m = SampleMessages().at(GetParam());
  Bytes bytes = Encode(m, 77);
  Result<Header> h = DecodeHeader(std::span(bytes).first(kHeaderSize));
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->type, TypeOf(m));
  EXPECT_EQ(h->request_id, 77u);
  Result<Message> payload = DecodePayload(*h, std::span(bytes).subspan(kHeaderSize));
  ASSERT_TRUE(payload.ok()) << payload.status().ToString();
  EXPECT_EQ(FieldsOf(*payload), FieldsOf(m));
}

// Every proper prefix of a payload is refused, whether the header still
// claims the full length or was rewritten to match.
TEST_P(ProtoRoundTripTest, EveryTruncationIsRefused) {
  const Message m = SampleMessages().at(GetParam());
  const Bytes full = Encode(m, 1);
  for (size_t cut = kHeaderSize; cut < full.size(); ++cut) {
    Bytes stale(full.begin(), full.begin() + cut);
    ExpectRefused(stale, StatusCode::kCorruption, "header says");
    Bytes fixed = stale;
    FixPayloadLength(&fixed);
    ExpectRefused(fixed, StatusCode::kCorruption, TypeName(TypeOf(m)));
    if (::testing::Test::HasFailure()) {
      FAIL() << TypeName(TypeOf(m)) << " cut at " << cut;
    }
  }
}

TEST_P(ProtoRoundTripTest, TrailingBytesAreRefused) {
  const Message m = SampleMessages().at(GetParam());
  Bytes bytes = Encode(m, 1);
  bytes.push_back(0);
  // The header still names the old length: the frame has a byte too many.
  ExpectRefused(bytes, StatusCode::kCorruption, "header says");
  // The header covers the extra byte: the payload has a byte nobody reads.
  FixPayloadLength(&bytes);
  ExpectRefused(bytes, StatusCode::kCorruption, "trailing bytes");
}

INSTANTIATE_TEST_SUITE_P(AllTypes, ProtoRoundTripTest,
                         ::testing::Range<size_t>(0, std::variant_size_v<Message>),
                         [](const ::testing::TestParamInfo<size_t>& info) {
                           return std::string(TypeName(TypeOf(SampleMessages().at(info.param))));
                         });

// The byte layout is a wire contract: pin one frame exactly.
TEST(ProtoWireTest, LeaveRequestBytesAreLittleEndianAsDocumented) {
  Bytes bytes = Encode(LeaveRequest{.node = 0x01020304}, 0x1122334455667788ull);
  const Bytes expected = {
      0x44, 0x53, 0x56, 0x4D,                          // "DSVM"
      0x0A, 0x00,                                      // version 10
      0x05, 0x00,                                      // type kLeaveRequest
      0x04, 0x00, 0x00, 0x00,                          // payload_length 4
      0x00, 0x00, 0x00, 0x00,                          // reserved
      0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,  // request_id
      0x04, 0x03, 0x02, 0x01,                          // node
  };
  EXPECT_EQ(bytes, expected);
}

TEST(ProtoWireTest, GrantFieldOrderIsPinned) {
  Bytes bytes = EncodeSample<Grant>();
  ASSERT_EQ(bytes.size(), kHeaderSize + 8 + 8 + 8 + 1 + 1 + 2 + 8 + 8);
  EXPECT_EQ(ReadLe(bytes, 24, 8), 0xFEDCBA9876543000ull);  // page
  EXPECT_EQ(ReadLe(bytes, 32, 8), 100u);                   // txn
  EXPECT_EQ(ReadLe(bytes, 40, 8), 1234u);                  // request_seq
  EXPECT_EQ(bytes[48], static_cast<uint8_t>(PageState::kModified));
  EXPECT_EQ(bytes[49], static_cast<uint8_t>(DataSource::kStash));
  EXPECT_EQ(ReadLe(bytes, 50, 2), static_cast<uint16_t>(StatusCode::kDataLoss));
  EXPECT_EQ(ReadLe(bytes, 52, 8), 18u);  // version
  EXPECT_EQ(ReadLe(bytes, 60, 8), 97u);  // stash_txn
}

TEST(ProtoWireTest, EncodeToAppendsAfterExistingBytes) {
  Bytes buffer = {0xAA, 0xBB, 0xCC};
  EncodeTo(LeaveRequest{.node = 9}, 5, &buffer);
  const size_t first_end = buffer.size();
  EncodeTo(RegionOpen{.name = "r"}, 6, &buffer);
  ASSERT_EQ(first_end, 3 + kHeaderSize + 4);
  EXPECT_EQ(buffer[0], 0xAA);
  EXPECT_EQ(buffer[2], 0xCC);

  Result<Frame> first = Decode(std::span(buffer).subspan(3, first_end - 3));
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(first->header.request_id, 5u);
  EXPECT_EQ(std::get<LeaveRequest>(first->message).node, 9u);

  Result<Frame> second = Decode(std::span(buffer).subspan(first_end));
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(second->header.request_id, 6u);
  EXPECT_EQ(std::get<RegionOpen>(second->message).name, "r");
}

TEST(ProtoWireTest, EmptyStringsBlobsAndListsRoundTrip) {
  for (const Message& m : std::vector<Message>{StatusReply{}, JoinRequest{}, RegionOpen{},
                                               PageQueryReply{}, PageData{}}) {
    Result<Frame> r = Decode(Encode(m, 3));
    ASSERT_TRUE(r.ok()) << TypeName(TypeOf(m)) << ": " << r.status().ToString();
    EXPECT_EQ(FieldsOf(r->message), FieldsOf(m));
  }
}

TEST(ProtoWireTest, StatusReplyCarriesAStatus) {
  Status s = NotFound("no region \"x\"");
  Result<Frame> r = Decode(Encode(ToReply(s), 1));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(FromReply(std::get<StatusReply>(r->message)), s);
  EXPECT_TRUE(FromReply(ToReply(Status::Ok())).ok());
  // An error text past the bound (a long path twice, say) is cut, not a crash.
  const Status long_error = IoError(std::string(3 * kMaxTextLength, 'p'));
  r = Decode(Encode(ToReply(long_error), 2));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const Status back = FromReply(std::get<StatusReply>(r->message));
  EXPECT_EQ(back.code(), StatusCode::kIoError);
  EXPECT_EQ(back.message().size(), kMaxTextLength);
  EXPECT_TRUE(back.message().ends_with("[...]"));
}

TEST(ProtoWireDeathTest, EncodingAFieldOverItsBoundIsAProgrammerError) {
  EXPECT_DEATH((void)Encode(StatusReply{.message = std::string(kMaxTextLength + 1, 'x')}, 1),
               "over its bound");
  EXPECT_DEATH((void)Encode(PageData{.data = Bytes(kMaxPageSize + 1)}, 1), "over its bound");
}

// ---------------------------------------------------------------------------
// Bounded fields: the largest value round trips; one more is refused.

struct BoundCase {
  const char* field;
  Message at_bound;
  size_t length_offset;  // of the u32 length/count, within the payload
  uint32_t bound;
  size_t element_size;  // bytes per counted element
};

std::vector<BoundCase> BoundCases() {
  PageQueryReply many_sharers{.page = 1, .sharers = std::vector<NodeId>(kMaxSharersInReply, 9)};
  return {
      {"StatusReply.message", StatusReply{.code = 1, .message = std::string(kMaxTextLength, 'm')},
       2, kMaxTextLength, 1},
      {"JoinRequest.address",
       JoinRequest{
           .node = 1, .address = std::string(kMaxAddressLength, 'a'), .transport_address = {1}},
       4, kMaxAddressLength, 1},
      {"JoinRequest.transport_address",
       JoinRequest{.node = 1, .address = "h:1", .transport_address = Bytes(kMaxBlobLength, 0xAB)},
       4 + 4 + 3 + 8 + 4, kMaxBlobLength, 1},
      {"RegionCreate.name", RegionCreate{.name = std::string(kMaxNameLength, 'c'), .size = 1}, 0,
       kMaxNameLength, 1},
      {"RegionOpen.name", RegionOpen{.name = std::string(kMaxNameLength, 'o')}, 0, kMaxNameLength,
       1},
      {"RegionDelete.name", RegionDelete{.name = std::string(kMaxNameLength, 'd')}, 0,
       kMaxNameLength, 1},
      {"RegionReply.name", RegionReply{.region = 1, .name = std::string(kMaxNameLength, 'r')},
       8 + 8 + 8 + 4, kMaxNameLength, 1},
      {"RegionCreated.name",
       RegionCreated{.region = 1, .base = 0, .size = 4096, .page_size = 4096,
                     .name = std::string(kMaxNameLength, 'n')},
       8 + 8 + 8 + 4, kMaxNameLength, 1},
      {"PageQueryReply.sharers", many_sharers, 8 + 1 + 4 + 8 + 8 + 1 + 1, kMaxSharersInReply, 4},
      {"PageData.data", PageData{.page = 1, .data = Bytes(kMaxPageSize, 0x5A)}, 8 + 8 + 4 + 8 + 8,
       kMaxPageSize, 1},
  };
}

TEST(ProtoBoundsTest, FieldAtItsBoundRoundTrips) {
  for (const BoundCase& c : BoundCases()) {
    SCOPED_TRACE(c.field);
    Bytes bytes = Encode(c.at_bound, 1);
    ASSERT_EQ(ReadLe(bytes, kHeaderSize + c.length_offset, 4), c.bound) << "offset drifted";
    Result<Frame> r = Decode(bytes);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(FieldsOf(r->message), FieldsOf(c.at_bound));
  }
}

TEST(ProtoBoundsTest, FieldOneOverItsBoundIsRefused) {
  for (const BoundCase& c : BoundCases()) {
    SCOPED_TRACE(c.field);
    Bytes bytes = Encode(c.at_bound, 1);
    const size_t at = kHeaderSize + c.length_offset;
    ASSERT_EQ(ReadLe(bytes, at, 4), c.bound) << "offset drifted";
    // A well-formed frame in every other respect: the extra element is there.
    WriteLe(&bytes, at, uint64_t{c.bound} + 1, 4);
    bytes.insert(bytes.begin() + at + 4 + c.bound * c.element_size, c.element_size, 0x01);
    FixPayloadLength(&bytes);
    ExpectRefused(bytes, StatusCode::kCorruption, "over bound");
  }
}

// ---------------------------------------------------------------------------
// Header refusals.

TEST(ProtoHeaderTest, ShortHeaderIsRefused) {
  Bytes header = HeaderBytes({});
  for (size_t n : {size_t{0}, size_t{1}, kHeaderSize - 1}) {
    Bytes shorter(header.begin(), header.begin() + n);
    Result<Header> h = DecodeHeader(shorter);
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.status().code(), StatusCode::kCorruption);
    ExpectRefused(shorter, StatusCode::kCorruption, "shorter than a header");
  }
  // DecodeHeader takes exactly one header, not more.
  Bytes longer = header;
  longer.push_back(0);
  Result<Header> h = DecodeHeader(longer);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), StatusCode::kCorruption);
}

TEST(ProtoHeaderTest, BadMagicIsCorruption) {
  for (uint32_t magic : {0u, 0x4453564Du /* byte-swapped */, kMagic ^ 1u, 0xFFFFFFFFu}) {
    Bytes frame = HeaderBytes({.magic = magic});
    AppendLe(&frame, 7, 4);
    Result<Header> h = DecodeHeader(std::span(frame).first(kHeaderSize));
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.status().code(), StatusCode::kCorruption);
    ExpectRefused(frame, StatusCode::kCorruption, "magic");
  }
}

TEST(ProtoHeaderTest, WrongVersionIsInvalidArgument) {
  for (uint16_t version : {uint16_t{0}, uint16_t{kWireVersion + 1}, uint16_t{0xFFFF}}) {
    Bytes frame = HeaderBytes({.version = version});
    AppendLe(&frame, 7, 4);
    Result<Header> h = DecodeHeader(std::span(frame).first(kHeaderSize));
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
    ExpectRefused(frame, StatusCode::kInvalidArgument, "version");
  }
}

TEST(ProtoHeaderTest, UnknownTypeIsInvalidArgument) {
  for (uint16_t type : {0, 19, 28, 29, 34, 61, 62, 0x100, 0xFFFF}) {
    Bytes frame = HeaderBytes({.type = type, .payload_length = 0});
    Result<Header> h = DecodeHeader(frame);
    ASSERT_FALSE(h.ok()) << "type " << type;
    EXPECT_EQ(h.status().code(), StatusCode::kInvalidArgument);
    ExpectRefused(frame, StatusCode::kInvalidArgument, "unknown message type");
  }
}

TEST(ProtoHeaderTest, EveryKnownTypeIsAccepted) {
  for (const Message& m : SampleMessages()) {
    Bytes frame = HeaderBytes({.type = static_cast<uint16_t>(TypeOf(m)), .payload_length = 0});
    Result<Header> h = DecodeHeader(frame);
    ASSERT_TRUE(h.ok()) << TypeName(TypeOf(m)) << ": " << h.status().ToString();
    EXPECT_EQ(h->type, TypeOf(m));
  }
}

TEST(ProtoHeaderTest, ReservedBitsAreCorruption) {
  for (uint32_t reserved : {1u, 0x100u, 0x80000000u, 0xFFFFFFFFu}) {
    Bytes frame = EncodeSample<Heartbeat>();
    WriteLe(&frame, 12, reserved, 4);
    Result<Header> h = DecodeHeader(std::span(frame).first(kHeaderSize));
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.status().code(), StatusCode::kCorruption);
    ExpectRefused(frame, StatusCode::kCorruption, "reserved");
  }
}

TEST(ProtoHeaderTest, PayloadLengthOverTheTypesBoundIsCorruption) {
  auto check = [](MessageType type, uint32_t length, bool accepted) {
    Bytes header = HeaderBytes({.type = static_cast<uint16_t>(type), .payload_length = length});
    Result<Header> h = DecodeHeader(header);
    EXPECT_EQ(h.ok(), accepted) << TypeName(type) << " length " << length;
    if (!h.ok()) {
      EXPECT_EQ(h.status().code(), StatusCode::kCorruption);
      EXPECT_NE(h.status().message().find("over its bound"), std::string::npos);
    }
  };
  check(MessageType::kRegionOpen, kMaxControlPayload, true);
  check(MessageType::kRegionOpen, kMaxControlPayload + 1, false);
  check(MessageType::kStatusReply, kMaxDataPayload, false);  // PageData's bound is not theirs
  check(MessageType::kAcquire, 0xFFFFFFFF, false);
  check(MessageType::kPageData, kMaxDataPayload, true);
  check(MessageType::kPageData, kMaxDataPayload + 1, false);
  check(MessageType::kPageData, 0xFFFFFFFF, false);

  // Whole frames: the header's bound is checked before the payload is read.
  Bytes frame = FrameOf(MessageType::kRegionOpen, Bytes(kMaxControlPayload + 1, 0));
  ExpectRefused(frame, StatusCode::kCorruption, "over its bound");
}

TEST(ProtoHeaderTest, PayloadThatDisagreesWithTheHeaderIsRefused) {
  Bytes frame = EncodeSample<Heartbeat>();
  Result<Header> h = DecodeHeader(std::span(frame).first(kHeaderSize));
  ASSERT_TRUE(h.ok());
  for (size_t n : {size_t{0}, size_t{3}, size_t{5}}) {
    Bytes payload(n, 0);
    Result<Message> m = DecodePayload(*h, payload);
    ASSERT_FALSE(m.ok()) << n;
    EXPECT_EQ(m.status().code(), StatusCode::kCorruption);
  }
}

// ---------------------------------------------------------------------------
// Field-value refusals. Offsets are within the payload; each test first checks
// that the byte it patches holds the sample's value, so a layout change fails
// loudly instead of patching the wrong byte.

struct ByteField {
  const char* field;
  Bytes frame;
  size_t offset;
  uint8_t max;  // largest valid value
};

std::vector<ByteField> EnumFields() {
  return {
      {"PageQueryReply.state", EncodeSample<PageQueryReply>(), 8, kMaxPageState},
      {"Acquire.kind", EncodeSample<Acquire>(), 12, kMaxAccessKind},
      {"Grant.state", EncodeSample<Grant>(), 24, kMaxPageState},
      {"Grant.source", EncodeSample<Grant>(), 25, kMaxDataSource},
      {"Fetch.next_state", EncodeSample<Fetch>(), 20, kMaxPageState},
      {"Advise.advice", EncodeSample<Advise>(), 16, kMaxAdvice},
  };
}

TEST(ProtoFieldTest, EnumZeroAndOverMaxAreRefused) {
  const std::vector<uint8_t> sample_values = {
      static_cast<uint8_t>(PageState::kModified), static_cast<uint8_t>(AccessKind::kUpgrade),
      static_cast<uint8_t>(PageState::kModified), static_cast<uint8_t>(DataSource::kStash),
      static_cast<uint8_t>(PageState::kInvalid), static_cast<uint8_t>(Advice::kReadMostly)};
  std::vector<ByteField> fields = EnumFields();
  ASSERT_EQ(fields.size(), sample_values.size());
  for (size_t i = 0; i < fields.size(); ++i) {
    const ByteField& f = fields[i];
    SCOPED_TRACE(f.field);
    const size_t at = kHeaderSize + f.offset;
    ASSERT_EQ(f.frame.at(at), sample_values[i]) << "offset drifted";
    for (uint8_t bad : {uint8_t{0}, uint8_t(f.max + 1), uint8_t{0xFF}}) {
      Bytes frame = f.frame;
      frame[at] = bad;
      ExpectRefused(frame, StatusCode::kCorruption,
                    "enum value " + std::to_string(bad) + " out of range");
    }
    for (uint8_t good = 1; good <= f.max; ++good) {
      Bytes frame = f.frame;
      frame[at] = good;
      EXPECT_TRUE(Decode(frame).ok()) << "value " << int{good};
    }
  }
}

TEST(ProtoFieldTest, FlagOtherThanZeroOrOneIsRefused) {
  const std::vector<std::pair<ByteField, uint8_t>> flags = {
      {{"Fetch.send_data", EncodeSample<Fetch>(), 21, 1}, 0},
      {{"PageQueryReply.lost", EncodeSample<PageQueryReply>(), 29, 1}, 1},
      {{"PageQueryReply.busy", EncodeSample<PageQueryReply>(), 30, 1}, 1},
  };
  for (const auto& [f, sample_value] : flags) {
    SCOPED_TRACE(f.field);
    const size_t at = kHeaderSize + f.offset;
    ASSERT_EQ(f.frame.at(at), sample_value) << "offset drifted";
    for (uint8_t bad : {uint8_t{2}, uint8_t{0x80}, uint8_t{0xFF}}) {
      Bytes frame = f.frame;
      frame[at] = bad;
      ExpectRefused(frame, StatusCode::kCorruption, "flag is not 0 or 1");
    }
    for (uint8_t good : {uint8_t{0}, uint8_t{1}}) {
      Bytes frame = f.frame;
      frame[at] = good;
      EXPECT_TRUE(Decode(frame).ok());
    }
  }
}

TEST(ProtoFieldTest, StatusCodeOutOfRangeIsRefused) {
  struct CodeField {
    const char* field;
    Bytes frame;
    size_t offset;
    StatusCode sample;
  };
  const std::vector<CodeField> codes = {
      {"StatusReply.code", EncodeSample<StatusReply>(), 0, StatusCode::kFailedPrecondition},
      {"Grant.status", EncodeSample<Grant>(), 26, StatusCode::kDataLoss},
      {"EvictReply.status", EncodeSample<EvictReply>(), 16, StatusCode::kFailedPrecondition},
  };
  for (const CodeField& f : codes) {
    SCOPED_TRACE(f.field);
    const size_t at = kHeaderSize + f.offset;
    ASSERT_EQ(ReadLe(f.frame, at, 2), static_cast<uint16_t>(f.sample)) << "offset drifted";
    for (uint16_t bad : {uint16_t(kMaxStatusCode + 1), uint16_t{0x100}, uint16_t{0xFFFF}}) {
      Bytes frame = f.frame;
      WriteLe(&frame, at, bad, 2);
      ExpectRefused(frame, StatusCode::kCorruption, "status code out of range");
    }
    for (uint16_t good : {uint16_t{0}, kMaxStatusCode}) {
      Bytes frame = f.frame;
      WriteLe(&frame, at, good, 2);
      EXPECT_TRUE(Decode(frame).ok());
    }
  }
}

// A length or count that stays within its bound but claims more than the
// payload holds.
TEST(ProtoFieldTest, LengthOverrunningThePayloadIsRefused) {
  struct LengthField {
    const char* field;
    Bytes frame;
    size_t offset;
    size_t element_size;
  };
  const std::vector<LengthField> lengths = {
      {"StatusReply.message", EncodeSample<StatusReply>(), 2, 1},
      {"JoinRequest.address", EncodeSample<JoinRequest>(), 4, 1},
      {"JoinRequest.transport_address", EncodeSample<JoinRequest>(), 4 + 4 + 13 + 8 + 4, 1},
      {"RegionCreate.name", EncodeSample<RegionCreate>(), 0, 1},
      {"RegionReply.name", EncodeSample<RegionReply>(), 28, 1},
      {"PageQueryReply.sharers", EncodeSample<PageQueryReply>(), 31, 4},
      {"PageData.data", EncodeSample<PageData>(), 36, 1},
  };
  const std::vector<size_t> sample_lengths = {19, 13, 4, 8, 8, 3, 4096};
  ASSERT_EQ(lengths.size(), sample_lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) {
    const LengthField& f = lengths[i];
    SCOPED_TRACE(f.field);
    const size_t at = kHeaderSize + f.offset;
    ASSERT_EQ(ReadLe(f.frame, at, 4), sample_lengths[i]) << "offset drifted";
    // One element more than every byte after the length field could hold.
    const uint64_t claim = (f.frame.size() - at - 4) / f.element_size + 1;
    Bytes frame = f.frame;
    WriteLe(&frame, at, claim, 4);
    ExpectRefused(frame, StatusCode::kCorruption, "overruns the payload");
  }
}

// A page batch names at least one page, each a whole number of minimal pages
// no larger than the largest page, and no more bytes than its bound.
TEST(ProtoFieldTest, PageBatchesOutOfBoundsAreRefused) {
  auto refused = [](const PageBatch& m) {
    Result<Frame> r = Decode(Encode(m, 5));
    return !r.ok() && r.status().code() == StatusCode::kCorruption;
  };
  const BatchedPage ok{.page = 0x200000000000, .txn = 1, .version = 1, .length = 4096};
  EXPECT_FALSE(refused(PageBatch{.sender = 1, .pages = {ok, ok}}));
  EXPECT_TRUE(refused(PageBatch{.sender = 1, .pages = {}}));
  for (uint32_t bad : {0u, 100u, 4097u, kMaxPageSize + 4096}) {
    BatchedPage b = ok;
    b.length = bad;
    EXPECT_TRUE(refused(PageBatch{.sender = 1, .pages = {ok, b}})) << bad;
  }
  BatchedPage big = ok;
  big.length = kMaxBatchBytes;
  EXPECT_FALSE(refused(PageBatch{.sender = 1, .pages = {big}}));
  EXPECT_TRUE(refused(PageBatch{.sender = 1, .pages = {big, ok}}));  // over kMaxBatchBytes
  EXPECT_EQ((PageBatch{.sender = 1, .pages = {ok, big}}.TotalBytes()), kMaxBatchBytes + 4096u);
}

// GPU maps name whole pages of a real range; a reply names a range inside
// its arena with the handle its device kind needs.
TEST(ProtoFieldTest, GpuMessagesOutOfRangeAreRefused) {
  auto refused = [](const Message& m) {
    Result<Frame> r = Decode(Encode(m, 5));
    return !r.ok() && r.status().code() == StatusCode::kCorruption;
  };
  const PageAddr a = 0x200000000000;
  EXPECT_FALSE(refused(GpuMap{.address = a, .length = 8192, .gpu = 0, .write = 1}));
  EXPECT_TRUE(refused(GpuMap{.address = a, .length = 0}));
  EXPECT_TRUE(refused(GpuMap{.address = a + 1, .length = 4096}));
  EXPECT_TRUE(refused(GpuMap{.address = a, .length = 4095}));
  EXPECT_TRUE(refused(GpuMap{.address = ~uint64_t{0} - 4095, .length = 8192}));
  EXPECT_FALSE(refused(GpuUnmap{.address = a, .length = 4096}));
  EXPECT_TRUE(refused(GpuUnmap{.address = a, .length = 0}));
  EXPECT_TRUE(refused(GpuUnmap{.address = a, .length = 100}));
  EXPECT_FALSE(refused(GpuPrefetch{.address = a, .length = 4096, .gpu = 1}));
  EXPECT_TRUE(refused(GpuPrefetch{.address = a, .length = 0}));
  EXPECT_TRUE(refused(GpuPrefetch{.address = a + 1, .length = 4096}));
  const GpuMapReply good{.gpu = 1, .kind = DeviceKind::kEmulated, .arena = 0x7f0000000000,
                         .arena_bytes = 1 << 20, .offset = 4096, .length = 8192};
  EXPECT_FALSE(refused(good));
  GpuMapReply bad = good;
  bad.arena = 0;
  EXPECT_TRUE(refused(bad));
  bad = good;
  bad.length = 0;
  EXPECT_TRUE(refused(bad));
  bad = good;
  bad.offset = (1 << 20) - 4096;  // runs past the arena
  EXPECT_TRUE(refused(bad));
  bad = good;
  bad.offset = ~uint64_t{0};  // would wrap
  EXPECT_TRUE(refused(bad));
  bad = good;
  bad.ipc_handle = std::vector<uint8_t>(kCudaIpcHandleSize, 1);  // emulated carries none
  EXPECT_TRUE(refused(bad));
  bad = good;
  bad.kind = DeviceKind::kCuda;  // cuda needs one
  EXPECT_TRUE(refused(bad));
  bad.ipc_handle = std::vector<uint8_t>(kCudaIpcHandleSize, 1);
  EXPECT_FALSE(refused(bad));
  bad = good;
  bad.kind = DeviceKind::kInvalid;
  EXPECT_TRUE(refused(bad));
}

// RegionDeleted names a real region's range: Decode refuses what no region
// could be (its fields are well formed, its values are not).
TEST(ProtoFieldTest, RegionDeletedOfNoPossibleRegionIsRefused) {
  const Bytes good = EncodeSample<RegionDeleted>();
  ASSERT_EQ(good.size(), kHeaderSize + 8 + 8 + 8);
  constexpr size_t kRegionAt = kHeaderSize, kBaseAt = kHeaderSize + 8, kSizeAt = kHeaderSize + 16;
  ASSERT_EQ(ReadLe(good, kRegionAt, 8), 0x8000000000000043ull) << "offset drifted";
  ASSERT_EQ(ReadLe(good, kBaseAt, 8), 0x8000000000200000ull) << "offset drifted";
  ASSERT_EQ(ReadLe(good, kSizeAt, 8), 0x7F00000000003000ull) << "offset drifted";
  struct Patch {
    const char* what;
    size_t at;
    uint64_t value;
    const char* why;
  };
  const std::vector<Patch> refused = {
      {"region 0", kRegionAt, 0, "region 0"},
      {"size 0", kSizeAt, 0, "size 0"},
      {"base off a page", kBaseAt, 0x8000000000200000ull + 8, "multiple of 4096"},
      {"base off by 2048", kBaseAt, 0x8000000000200800ull, "multiple of 4096"},
      {"size off a page", kSizeAt, 4096 + 1, "multiple of 4096"},
      {"range wraps", kBaseAt, 0xFFFFFFFFFFFFF000ull, "wraps"},
  };
  for (const Patch& p : refused) {
    SCOPED_TRACE(p.what);
    Bytes frame = good;
    WriteLe(&frame, p.at, p.value, 8);
    ExpectRefused(frame, StatusCode::kCorruption, p.why);
    ExpectRefused(frame, StatusCode::kCorruption, "RegionDeleted");
  }
  // The smallest region, at the bottom and at the top of the address space.
  for (const auto& [base, size] : std::vector<std::pair<uint64_t, uint64_t>>{
           {0, 4096}, {0xFFFFFFFFFFFFE000ull, 4096}, {0x200000, 2u << 20}}) {
    Bytes frame = good;
    WriteLe(&frame, kBaseAt, base, 8);
    WriteLe(&frame, kSizeAt, size, 8);
    Result<Frame> r = Decode(frame);
    ASSERT_TRUE(r.ok()) << base << "+" << size << ": " << r.status().ToString();
    EXPECT_EQ(std::get<RegionDeleted>(r->message).base, base);
    EXPECT_EQ(std::get<RegionDeleted>(r->message).size, size);
  }
}

// RegionCreated, like RegionDeleted, names a region a coordinator could
// have made: a follower shard never puts anything else in its table.
TEST(ProtoFieldTest, RegionCreatedOfNoPossibleRegionIsRefused) {
  const Bytes good = EncodeSample<RegionCreated>();
  constexpr size_t kRegionAt = kHeaderSize, kBaseAt = kHeaderSize + 8, kSizeAt = kHeaderSize + 16,
                   kPageSizeAt = kHeaderSize + 24;
  ASSERT_EQ(ReadLe(good, kRegionAt, 8), 0x8000000000000044ull) << "offset drifted";
  ASSERT_EQ(ReadLe(good, kBaseAt, 8), 0x8000000000400000ull) << "offset drifted";
  ASSERT_EQ(ReadLe(good, kSizeAt, 8), 0x7F00000000030000ull) << "offset drifted";
  ASSERT_EQ(ReadLe(good, kPageSizeAt, 4), 65536u) << "offset drifted";
  struct Patch {
    const char* what;
    size_t at;
    int width;
    uint64_t value;
    const char* why;
  };
  const std::vector<Patch> refused = {
      {"region 0", kRegionAt, 8, 0, "region 0"},
      {"size 0", kSizeAt, 8, 0, "size 0"},
      {"page size 0", kPageSizeAt, 4, 0, "page size 0 is not"},
      {"page size 8 KiB", kPageSizeAt, 4, 8192, "page size 8192 is not"},
      {"page size 4 MiB", kPageSizeAt, 4, 4u << 20, "is not 4096, 65536 or 2097152"},
      {"base off a large page", kBaseAt, 8, 0x8000000000404000ull, "multiple of the page size"},
      {"size off a large page", kSizeAt, 8, 0x7F00000000031000ull, "multiple of the page size"},
      {"range wraps", kBaseAt, 8, 0xFFFFFFFFFFFF0000ull, "wraps"},
  };
  for (const Patch& p : refused) {
    SCOPED_TRACE(p.what);
    Bytes frame = good;
    WriteLe(&frame, p.at, p.value, p.width);
    ExpectRefused(frame, StatusCode::kCorruption, p.why);
    ExpectRefused(frame, StatusCode::kCorruption, "RegionCreated");
  }
  // A nameless region: the field is well formed (length 0), the value is not.
  ExpectRefused(Encode(RegionCreated{.region = 1, .base = 0x200000, .size = 4096,
                                     .page_size = 4096, .name = ""},
                       1),
                StatusCode::kCorruption, "empty region name");
  // Every page size a region may have, and the top of the address space.
  for (const auto& [base, size, page_size] :
       std::vector<std::tuple<uint64_t, uint64_t, uint32_t>>{
           {0x200000, 4096, 4096},
           {0x210000, 65536, 65536},
           {0x200000, 4u << 20, 2u << 20},
           {0xFFFFFFFFFFC00000ull, 2u << 20, 2u << 20}}) {
    Bytes frame = good;
    WriteLe(&frame, kBaseAt, base, 8);
    WriteLe(&frame, kSizeAt, size, 8);
    WriteLe(&frame, kPageSizeAt, page_size, 4);
    Result<Frame> r = Decode(frame);
    ASSERT_TRUE(r.ok()) << base << "+" << size << "/" << page_size << ": " << r.status().ToString();
    EXPECT_EQ(std::get<RegionCreated>(r->message).base, base);
    EXPECT_EQ(std::get<RegionCreated>(r->message).page_size, page_size);
  }
}

// The watch and its snapshot marker carry no value Decode could refuse
// beyond their fields: any count is a count.
TEST(ProtoFieldTest, RegionWatchAndSnapshotDoneDecodeAsSent) {
  Result<Frame> watch = Decode(Encode(RegionWatch{}, 9));
  ASSERT_TRUE(watch.ok()) << watch.status().ToString();
  EXPECT_EQ(watch->header.payload_length, 0u);
  EXPECT_TRUE(std::holds_alternative<RegionWatch>(watch->message));
  for (uint64_t n : {uint64_t{0}, uint64_t{1}, ~uint64_t{0}}) {
    Result<Frame> done = Decode(Encode(RegionSnapshotDone{.regions = n}, 9));
    ASSERT_TRUE(done.ok()) << done.status().ToString();
    EXPECT_EQ(std::get<RegionSnapshotDone>(done->message).regions, n);
  }
  // RegionWatch has no payload: a byte there is refused.
  ExpectRefused(FrameOf(MessageType::kRegionWatch, Bytes{0}), StatusCode::kCorruption,
                "trailing bytes");
}

// Every Acquire names the region the node maps at the page (wire version
// 5): one naming none is refused, whatever else it says.
TEST(ProtoFieldTest, AnAcquireOfNoRegionIsRefused) {
  Acquire a{.page = 0x200000000000ull, .node = 2, .kind = AccessKind::kRead, .request_seq = 1};
  ExpectRefused(Encode(a, 0), StatusCode::kCorruption, "names no region");
  a.region = 1;
  Result<Frame> ok = Decode(Encode(a, 0));
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(std::get<Acquire>(ok->message).region, 1u);
}

TEST(ProtoFieldTest, AReadDirectOfNoRegionOrAnUnalignedPageIsRefused) {
  ReadDirect r{.page = 0x200000000000ull, .node = 2, .region = 0};
  ExpectRefused(Encode(r, 0), StatusCode::kCorruption, "names no region");
  r.region = 3;
  r.page += 512;
  ExpectRefused(Encode(r, 0), StatusCode::kCorruption, "not aligned");
  r.page -= 512;
  Result<Frame> ok = Decode(Encode(r, 0));
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(std::get<ReadDirect>(ok->message), r);
}

// Decode checks a claimed length against the bound and the bytes present
// before it allocates: a huge claim in a tiny frame is refused at once.
TEST(ProtoFieldTest, HugeClaimedLengthInASmallFrameIsRefused) {
  Bytes payload;
  AppendLe(&payload, 1, 8);  // page
  AppendLe(&payload, 2, 8);  // txn
  AppendLe(&payload, 3, 4);  // sender
  AppendLe(&payload, 4, 8);  // version
  AppendLe(&payload, 5, 8);  // region
  AppendLe(&payload, 0xFFFFFFFF, 4);
  payload.insert(payload.end(), {1, 2, 3, 4});
  ExpectRefused(FrameOf(MessageType::kPageData, payload), StatusCode::kCorruption, "over bound");

  // Within the blob's bound but far beyond the frame.
  WriteLe(&payload, 36, kMaxPageSize, 4);
  ExpectRefused(FrameOf(MessageType::kPageData, payload), StatusCode::kCorruption,
                "overruns the payload");

  Bytes status_reply;
  AppendLe(&status_reply, 0, 2);
  AppendLe(&status_reply, 0xFFFFFFFF, 4);
  ExpectRefused(FrameOf(MessageType::kStatusReply, status_reply), StatusCode::kCorruption,
                "over bound");

  Bytes join;
  AppendLe(&join, 1, 4);
  AppendLe(&join, 0, 4);  // empty address
  AppendLe(&join, 0, 8);
  AppendLe(&join, 0, 4);
  AppendLe(&join, 0xFFFFFFFF, 4);
  ExpectRefused(FrameOf(MessageType::kJoinRequest, join), StatusCode::kCorruption, "over bound");

  Bytes query = EncodeSample<PageQueryReply>();
  WriteLe(&query, kHeaderSize + 31, 0xFFFFFFFF, 4);
  ExpectRefused(query, StatusCode::kCorruption, "over bound");
}


// ---------------------------------------------------------------------------
// PageRun: packing and expansion.

// The page of a message a PageRun may hold, or nothing.
std::optional<PageAddr> RunPageOf(const Message& m, uint64_t request_id) {
  if (request_id != 0) return std::nullopt;
  std::optional<PageRun::Item> item = PageRunItemOf(m);
  if (!item) return std::nullopt;
  return std::visit([](const auto& x) { return x.page; }, *item);
}

// What the receiver must see of a sent sequence: between two messages that
// are not in runs (which keep their places), the same messages, and for
// each page its messages in the order sent.
std::vector<std::vector<std::string>> ReceiverView(
    const std::vector<std::pair<Message, uint64_t>>& seq) {
  std::vector<std::vector<std::string>> view;
  std::map<PageAddr, std::string> per_page;
  std::vector<std::string> segment;
  auto close = [&] {
    std::sort(segment.begin(), segment.end());
    view.push_back(segment);
    for (auto& [page, order] : per_page) view.push_back({std::to_string(page) + ":" + order});
    segment.clear();
    per_page.clear();
  };
  for (const auto& [m, rid] : seq) {
    std::string text = std::to_string(rid) + "/";
    for (const std::string& f : FieldsOf(m)) text += f + ",";
    text = std::string(TypeName(TypeOf(m))) + "/" + text;
    if (auto page = RunPageOf(m, rid)) {
      segment.push_back(text);
      per_page[*page] += text + ";";
    } else {
      close();
      view.push_back({text});
    }
  }
  close();
  return view;
}

// Packs `in` as a sender does, decodes every frame, expands every run; the
// receiver must see what ReceiverView says. Returns the frames' types.
std::vector<MessageType> PackAndExpand(const std::vector<std::pair<Message, uint64_t>>& in) {
  RunPacker packer;
  Bytes wire;
  for (const auto& [m, rid] : in) packer.Add(m, rid, &wire);
  packer.Finish(&wire);
  std::vector<MessageType> frames;
  std::vector<std::pair<Message, uint64_t>> out;
  size_t pos = 0;
  while (pos < wire.size()) {
    Result<Header> h = DecodeHeader(std::span(wire).subspan(pos, kHeaderSize));
    EXPECT_TRUE(h.ok()) << h.status().ToString();
    if (!h.ok()) break;
    const size_t end = pos + kHeaderSize + h->payload_length;
    Result<Frame> f = Decode(std::span(wire).subspan(pos, end - pos));
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    if (!f.ok()) break;
    pos = end;
    frames.push_back(f->header.type);
    if (const auto* run = std::get_if<PageRun>(&f->message)) {
      for (uint32_t i = 0; i < run->count; ++i) out.emplace_back(PageRunAt(*run, i), 0);
    } else {
      out.emplace_back(f->message, f->header.request_id);
    }
  }
  EXPECT_EQ(out.size(), in.size());
  EXPECT_EQ(ReceiverView(out), ReceiverView(in));
  return frames;
}

Acquire ReadOf(PageAddr page, uint64_t seq) {
  return Acquire{.page = page, .node = 2, .kind = AccessKind::kRead, .request_seq = seq,
                 .last_txn = 7, .region = 9};
}

TEST(PageRunTest, LinedUpMessagesGoAsOneRunAndComeBackAsSent) {
  constexpr PageAddr kBase = 0x200000000000ull;
  std::vector<std::pair<Message, uint64_t>> in;
  for (uint64_t i = 0; i < 10; ++i) in.emplace_back(ReadOf(kBase + i * 4096, 100 + i), 0);
  for (uint64_t i = 0; i < 3; ++i) {
    in.emplace_back(Done{.page = kBase + 0x100000 + i * 65536, .txn = 4, .node = 2}, 0);
  }
  in.emplace_back(Heartbeat{.node = 2}, 55);  // a request: never in a run
  for (uint64_t i = 0; i < 4; ++i) {
    in.emplace_back(Grant{.page = kBase + i * 4096, .txn = 3, .request_seq = 100,
                          .state = PageState::kShared, .source = DataSource::kOwner,
                          .version = 1},
                    0);
  }
  std::vector<MessageType> frames = PackAndExpand(in);
  EXPECT_EQ(frames, (std::vector<MessageType>{MessageType::kPageRun, MessageType::kPageRun,
                                              MessageType::kHeartbeat, MessageType::kPageRun}));
}

TEST(PageRunTest, MessagesThatDoNotLineUpGoAlone) {
  constexpr PageAddr kBase = 0x200000000000ull;
  auto pair = [](Message a, Message b, uint64_t rid = 0) {
    return std::vector<std::pair<Message, uint64_t>>{{std::move(a), rid}, {std::move(b), rid}};
  };
  const std::vector<MessageType> alone = {MessageType::kAcquire, MessageType::kAcquire};
  Acquire other_kind = ReadOf(kBase + 4096, 2);
  other_kind.kind = AccessKind::kWrite;
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase, 1), other_kind)), alone) << "another field differs";
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase + 4096, 1), ReadOf(kBase, 2))), alone) << "backwards";
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase, 1), ReadOf(kBase, 2))), alone) << "same page";
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase, 1), ReadOf(kBase + 4096, 3))), alone) << "seq + 2";
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase, 2), ReadOf(kBase + 4096, 1))), alone) << "seq - 1";
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase, 1), ReadOf(kBase + (4u << 20), 2))), alone)
      << "stride over the largest page";
  EXPECT_EQ(PackAndExpand(pair(ReadOf(kBase, 1), ReadOf(kBase + 4096, 2), 8)), alone)
      << "a request id";
  EXPECT_EQ(PackAndExpand(pair(Done{.page = kBase, .txn = 1, .node = 2},
                               Release{.page = kBase + 4096, .txn = 1})),
            (std::vector<MessageType>{MessageType::kDone, MessageType::kRelease}));
  // Three in line whose third breaks the stride the second set.
  std::vector<std::pair<Message, uint64_t>> three = pair(ReadOf(kBase, 1), ReadOf(kBase + 4096, 2));
  three.emplace_back(ReadOf(kBase + 3 * 4096, 3), 0);
  EXPECT_EQ(PackAndExpand(three), (std::vector<MessageType>{MessageType::kPageRun,
                                                            MessageType::kAcquire}));
}

TEST(PageRunTest, ARunHoldsAtMostkMaxRunPages) {
  std::vector<std::pair<Message, uint64_t>> in;
  for (uint64_t i = 0; i < kMaxRunPages + 1; ++i) {
    in.emplace_back(Release{.page = 0x200000000000ull + i * 4096, .txn = 5}, 0);
  }
  EXPECT_EQ(PackAndExpand(in),
            (std::vector<MessageType>{MessageType::kPageRun, MessageType::kRelease}));
}

// A prefetch's next Acquires and the Dones of its grants alternate in the
// daemon's queue: each stream packs into its own run. A page's own
// messages keep their order: Done(p) then Acquire(p) never swap.
TEST(PageRunTest, InterleavedStreamsPackApartAndAPageKeepsItsOrder) {
  constexpr PageAddr kBase = 0x200000000000ull;
  std::vector<std::pair<Message, uint64_t>> in;
  for (uint64_t i = 0; i < 8; ++i) {
    in.emplace_back(Done{.page = kBase + i * 4096, .txn = 2, .node = 2}, 0);
    in.emplace_back(ReadOf(kBase + (256 + i) * 4096, 300 + i), 0);
  }
  EXPECT_EQ(PackAndExpand(in),
            (std::vector<MessageType>{MessageType::kPageRun, MessageType::kPageRun}));
  // Page kBase + 3 pages: its Done is in the open Done run when its next
  // Acquire comes, so the open runs leave first. (Here the Done run is the
  // older and would leave first anyway; the case below is the one that
  // needs the rule.)
  std::vector<std::pair<Message, uint64_t>> same_page;
  for (uint64_t i = 0; i < 4; ++i) {
    same_page.emplace_back(Done{.page = kBase + i * 4096, .txn = 2, .node = 2}, 0);
  }
  same_page.emplace_back(ReadOf(kBase + 3 * 4096, 9), 0);
  same_page.emplace_back(ReadOf(kBase + 4 * 4096, 10), 0);
  EXPECT_EQ(PackAndExpand(same_page),
            (std::vector<MessageType>{MessageType::kPageRun, MessageType::kPageRun}));
  // The Acquire run is older, and page 5's Acquire would extend it (stride
  // 5 pages): it must not, or it would leave before page 5's Done.
  std::vector<std::pair<Message, uint64_t>> older_run;
  older_run.emplace_back(ReadOf(kBase, 1), 0);
  older_run.emplace_back(Done{.page = kBase + 5 * 4096, .txn = 2, .node = 2}, 0);
  older_run.emplace_back(ReadOf(kBase + 5 * 4096, 2), 0);
  EXPECT_EQ(PackAndExpand(older_run), (std::vector<MessageType>{MessageType::kAcquire,
                                                                MessageType::kDone,
                                                                MessageType::kAcquire}));
}

// The packer never builds a run the receiver would refuse as wrapping: a
// page or request_seq past 2^64 starts a new run instead.
TEST(PageRunTest, NoRunWrapsPastTheLastAddressOrSeq) {
  const PageAddr top = ~uint64_t{0} - 8191;  // the last two pages
  std::vector<std::pair<Message, uint64_t>> in;
  in.emplace_back(ReadOf(top, 1), 0);
  in.emplace_back(ReadOf(top + 4096, 2), 0);
  in.emplace_back(ReadOf(0, 3), 0);  // top + 2 pages, wrapped
  EXPECT_EQ(PackAndExpand(in), (std::vector<MessageType>{MessageType::kPageRun,
                                                         MessageType::kAcquire}));
  const uint64_t last = ~uint64_t{0};
  in.clear();
  in.emplace_back(ReadOf(0x200000000000ull, last - 1), 0);
  in.emplace_back(ReadOf(0x200000001000ull, last), 0);
  in.emplace_back(ReadOf(0x200000002000ull, 0), 0);  // last + 1, wrapped
  EXPECT_EQ(PackAndExpand(in), (std::vector<MessageType>{MessageType::kPageRun,
                                                         MessageType::kAcquire}));
}

// A FramedSocket connected to a plain socket the test writes raw frames to.
struct RawPeer {
  int listen_fd = -1;
  int fd = -1;
  std::optional<FramedSocket> sock;
  ~RawPeer() {
    if (fd >= 0) ::close(fd);
    if (listen_fd >= 0) ::close(listen_fd);
  }
  void Start() {
    listen_fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(listen_fd, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(listen_fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ASSERT_EQ(::listen(listen_fd, 1), 0);
    socklen_t len = sizeof(a);
    ASSERT_EQ(::getsockname(listen_fd, reinterpret_cast<sockaddr*>(&a), &len), 0);
    auto s = FramedSocket::Connect("127.0.0.1:" + std::to_string(ntohs(a.sin_port)), 2000);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    sock.emplace(std::move(*s));
    fd = ::accept(listen_fd, nullptr, nullptr);
    ASSERT_GE(fd, 0);
  }
  void Write(const Bytes& b) { ASSERT_EQ(::send(fd, b.data(), b.size(), 0), ssize_t(b.size())); }
};

PageRun FourGrants() {
  return PageRun{.count = 4, .page_stride = 4096, .seq_stride = 1,
                 .first = Grant{.page = 0x200000000000ull, .txn = 3, .request_seq = 40,
                                .state = PageState::kShared, .source = DataSource::kOwner,
                                .version = 2}};
}

void ExpectGrant(const Result<Frame>& f, uint32_t i) {
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->header.type, MessageType::kGrant);
  EXPECT_EQ(f->header.request_id, 0u);
  const auto* g = std::get_if<Grant>(&f->message);
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->page, 0x200000000000ull + i * 4096);
  EXPECT_EQ(g->request_seq, 40u + i);
}

// Both ways of reading (Receive, and ReadAvailable + NextFrame, the node
// daemon's) give a run as its messages, then what followed it; a socket
// moved in the middle of a run goes on with it, the moved-from one has
// nothing left; a run with a request id is refused.
TEST(FramedSocketRunTest, ARunIsReadAsItsMessages) {
  RawPeer peer;
  ASSERT_NO_FATAL_FAILURE(peer.Start());
  Bytes two = Encode(FourGrants(), 0);
  Bytes reply = Encode(StatusReply{}, 9);
  two.insert(two.end(), reply.begin(), reply.end());

  peer.Write(two);
  for (uint32_t i = 0; i < 4; ++i) ExpectGrant(peer.sock->Receive(2000), i);
  Result<Frame> r = peer.sock->Receive(2000);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->header.request_id, 9u);
  EXPECT_TRUE(std::holds_alternative<StatusReply>(r->message));

  peer.Write(two);
  std::vector<Frame> got;
  for (int tries = 0; tries < 200 && got.size() < 5; ++tries) {
    ASSERT_TRUE(peer.sock->ReadAvailable().ok());
    for (;;) {
      auto f = peer.sock->NextFrame();
      ASSERT_TRUE(f.ok()) << f.status().ToString();
      if (!f->has_value()) break;
      got.push_back(std::move(**f));
    }
    if (got.size() < 5) ::usleep(10000);
  }
  ASSERT_EQ(got.size(), 5u);
  for (uint32_t i = 0; i < 4; ++i) ExpectGrant(got[i], i);
  EXPECT_TRUE(std::holds_alternative<StatusReply>(got[4].message));

  peer.Write(Encode(FourGrants(), 0));
  ExpectGrant(peer.sock->Receive(2000), 0);
  FramedSocket moved = std::move(*peer.sock);
  for (uint32_t i = 1; i < 4; ++i) ExpectGrant(moved.Receive(2000), i);
  EXPECT_FALSE(peer.sock->is_open());
  auto left = peer.sock->NextFrame();
  ASSERT_TRUE(left.ok());
  EXPECT_FALSE(left->has_value()) << "the moved-from socket kept the run";

  peer.Write(Encode(FourGrants(), 5));
  Result<Frame> refused = moved.Receive(2000);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kCorruption);
  EXPECT_NE(refused.status().message().find("request id 5"), std::string::npos)
      << refused.status().ToString();
}

TEST(PageRunTest, RunsThatMeanNothingOrWrapAreRefused) {
  const PageRun good{.count = 4, .page_stride = 4096, .seq_stride = 1,
                     .first = ReadOf(0x200000000000ull, 1)};
  ASSERT_TRUE(Decode(Encode(good, 0)).ok());
  auto refused = [&](PageRun r, std::string_view why) {
    ExpectRefused(Encode(r, 0), StatusCode::kCorruption, why);
  };
  PageRun r = good;
  r.count = 1;
  refused(r, "a run of 1 messages");
  r.count = kMaxRunPages + 1;
  refused(r, "a run of 1025 messages");
  r = good;
  for (uint32_t stride : {0u, 100u, 8u << 20}) {
    r.page_stride = stride;
    refused(r, "page stride of " + std::to_string(stride));
  }
  r = good;
  r.first = Fetch{.page = 0x200000000000ull, .txn = 1, .requester = 2};
  refused(r, "a run of Fetch with a request_seq stride");
  r = good;
  std::get<Acquire>(r.first).page = ~uint64_t{0} - 8191;
  refused(r, "last page wraps");
  r = good;
  std::get<Acquire>(r.first).request_seq = ~uint64_t{0} - 1;
  refused(r, "last request_seq wraps");
  r = good;
  std::get<Acquire>(r.first).region = 0;
  refused(r, "names no region");
  // A type that has no place in a run: rewrite the inner type field.
  Bytes b = Encode(good, 0);
  WriteLe(&b, kHeaderSize, static_cast<uint16_t>(MessageType::kHeartbeat), 2);
  ExpectRefused(b, StatusCode::kCorruption, "cannot be in a PageRun");
}

}  // namespace
}  // namespace dsvm::proto

// ---------------------------------------------------------------------------
// PageRecord: what the coordinator persists, through the same field codec.

namespace dsvm::coordinator {
namespace {

using proto::DecodeFields;
using proto::EncodeFields;

PageRecord BusyRecord() {
  PageRecord r;
  r.page = 0xFEDCBA9876543000ull;
  r.state = PageState::kShared;
  r.owner = 3;
  r.sharers = {
      {.node = 3, .since = 90}, {.node = 4, .since = 95}, {.node = 0x80000005, .since = 101}};
  r.version = 0x8000000000000017ull;
  r.txn = 101;
  r.lost = 1;
  r.busy = 1;
  r.tx.txn = 101;
  r.tx.requester = 5;
  r.tx.request_seq = 77;
  r.tx.grant_state = PageState::kModified;
  r.tx.source = DataSource::kOwner;
  r.tx.stash_txn = 100;
  r.tx.fetch_from = 3;
  r.tx.fetch_next = PageState::kInvalid;
  r.tx.fetch_send_data = 1;
  r.tx.prev_state = PageState::kShared;
  r.tx.pending_acks = {4, 6};
  r.tx.grant_sent = 1;
  r.tx.last_send_ms = 123456789;
  return r;
}

// Byte offsets in BusyRecord()'s encoding (3 sharers, 2 pending acks).
constexpr size_t kStateAt = 8;
constexpr size_t kSharerCountAt = 13;
constexpr size_t kLostAt = 69;
constexpr size_t kTxGrantStateAt = 91;
constexpr size_t kTxSourceAt = 92;
constexpr size_t kTxFetchNextAt = 105;
constexpr size_t kTxPrevStateAt = 107;
constexpr size_t kPendingAcksAt = 108;
constexpr size_t kGrantSentAt = 120;
constexpr size_t kRecordSize = 129;

TEST(PageRecordCodecTest, EveryFieldOfTheSampleDiffersFromItsDefault) {
  std::vector<std::string> sample = proto::FieldsOf(BusyRecord());
  std::vector<std::string> defaults = proto::FieldsOf(PageRecord{});
  ASSERT_EQ(sample.size(), defaults.size());
  for (size_t i = 0; i < sample.size(); ++i) EXPECT_NE(sample[i], defaults[i]) << "field " << i;
}

TEST(PageRecordCodecTest, BusyRecordRoundTrips) {
  const PageRecord in = BusyRecord();
  std::vector<uint8_t> bytes = EncodeFields(in);
  ASSERT_EQ(bytes.size(), kRecordSize);

  PageRecord out;
  Status s = DecodeFields(bytes, &out);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(proto::FieldsOf(out), proto::FieldsOf(in));
  EXPECT_EQ(out.page, in.page);
  EXPECT_EQ(out.state, PageState::kShared);
  ASSERT_EQ(out.sharers.size(), 3u);
  EXPECT_EQ(out.sharers[2].node, 0x80000005u);
  EXPECT_EQ(out.sharers[2].since, 101u);
  EXPECT_EQ(out.busy, 1);
  EXPECT_EQ(out.tx.grant_state, PageState::kModified);
  EXPECT_EQ(out.tx.source, DataSource::kOwner);
  EXPECT_EQ(out.tx.pending_acks, (std::vector<NodeId>{4, 6}));
  EXPECT_EQ(out.tx.last_send_ms, 123456789u);
  ASSERT_NE(out.FindSharer(4), nullptr);
  EXPECT_EQ(out.FindSharer(4)->since, 95u);
  EXPECT_EQ(EncodeFields(out), bytes);
}

// Decoding replaces what the record held; nothing old survives.
TEST(PageRecordCodecTest, DecodeOverwritesAnOlderRecord) {
  PageRecord small;
  small.page = 1;
  small.state = PageState::kModified;
  small.owner = 9;
  small.sharers = {{.node = 9, .since = 1}};
  std::vector<uint8_t> bytes = EncodeFields(small);

  PageRecord target = BusyRecord();
  Status s = DecodeFields(bytes, &target);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(proto::FieldsOf(target), proto::FieldsOf(small));
  EXPECT_EQ(target.sharers.size(), 1u);
  EXPECT_TRUE(target.tx.pending_acks.empty());
}

TEST(PageRecordCodecTest, TruncatedAndTrailingBytesAreCorruption) {
  const std::vector<uint8_t> bytes = EncodeFields(BusyRecord());
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    PageRecord out;
    Status s = DecodeFields(std::span(bytes).first(cut), &out);
    ASSERT_EQ(s.code(), StatusCode::kCorruption) << "cut at " << cut << ": " << s.ToString();
  }
  std::vector<uint8_t> longer = bytes;
  longer.push_back(0);
  PageRecord out;
  Status s = DecodeFields(longer, &out);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_NE(s.message().find("trailing bytes"), std::string::npos) << s.ToString();
}

TEST(PageRecordCodecTest, BadFieldValuesAreCorruption) {
  const std::vector<uint8_t> good = EncodeFields(BusyRecord());
  ASSERT_EQ(good.at(kStateAt), static_cast<uint8_t>(PageState::kShared));
  ASSERT_EQ(proto::ReadLe(good, kSharerCountAt, 4), 3u);
  ASSERT_EQ(good.at(kLostAt), 1);
  ASSERT_EQ(good.at(kTxGrantStateAt), static_cast<uint8_t>(PageState::kModified));
  ASSERT_EQ(good.at(kTxSourceAt), static_cast<uint8_t>(DataSource::kOwner));
  ASSERT_EQ(good.at(kTxFetchNextAt), static_cast<uint8_t>(PageState::kInvalid));
  ASSERT_EQ(good.at(kTxPrevStateAt), static_cast<uint8_t>(PageState::kShared));
  ASSERT_EQ(proto::ReadLe(good, kPendingAcksAt, 4), 2u);
  ASSERT_EQ(good.at(kGrantSentAt), 1);

  struct Patch {
    const char* what;
    size_t at;
    uint8_t value;
    const char* why;
  };
  const std::vector<Patch> patches = {
      {"state 0", kStateAt, 0, "out of range"},
      {"state max+1", kStateAt, proto::kMaxPageState + 1, "out of range"},
      {"tx.grant_state 0", kTxGrantStateAt, 0, "out of range"},
      {"tx.source max+1", kTxSourceAt, proto::kMaxDataSource + 1, "out of range"},
      {"tx.fetch_next max+1", kTxFetchNextAt, proto::kMaxPageState + 1, "out of range"},
      {"tx.prev_state 0", kTxPrevStateAt, 0, "out of range"},
      {"lost 2", kLostAt, 2, "flag"},
      {"grant_sent 2", kGrantSentAt, 2, "flag"},
  };
  for (const Patch& p : patches) {
    std::vector<uint8_t> bytes = good;
    bytes[p.at] = p.value;
    PageRecord out;
    Status s = DecodeFields(bytes, &out);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << p.what;
    EXPECT_NE(s.message().find(p.why), std::string::npos) << p.what << ": " << s.ToString();
  }
}

TEST(PageRecordCodecTest, ListCountsOverBoundOrOverrunningAreCorruption) {
  const std::vector<uint8_t> good = EncodeFields(BusyRecord());
  struct Patch {
    const char* what;
    size_t at;
    uint32_t count;
    const char* why;
  };
  const std::vector<Patch> patches = {
      {"sharers over kMaxNodes", kSharerCountAt, kMaxNodes + 1, "over bound"},
      {"sharers 0xFFFFFFFF", kSharerCountAt, 0xFFFFFFFF, "over bound"},
      {"sharers past the end", kSharerCountAt, kRecordSize, "overruns"},
      {"sharers one too many", kSharerCountAt, 4, ""},  // misparses the rest
      {"pending_acks over kMaxNodes", kPendingAcksAt, kMaxNodes + 1, "over bound"},
      {"pending_acks past the end", kPendingAcksAt, 6, "overruns"},
  };
  for (const Patch& p : patches) {
    std::vector<uint8_t> bytes = good;
    for (int i = 0; i < 4; ++i) bytes[p.at + i] = static_cast<uint8_t>(p.count >> (8 * i));
    PageRecord out;
    Status s = DecodeFields(bytes, &out);
    EXPECT_EQ(s.code(), StatusCode::kCorruption) << p.what;
    EXPECT_NE(s.message().find(p.why), std::string::npos) << p.what << ": " << s.ToString();
  }
}

}  // namespace
}  // namespace dsvm::coordinator

// ---------------------------------------------------------------------------
// Status and Result.

namespace dsvm {
namespace {

TEST(StatusTest, CodesKeepTheirWireValues) {
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kOk), 0);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kInvalidArgument), 1);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kNotFound), 2);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kAlreadyExists), 3);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kPermissionDenied), 4);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kUnavailable), 5);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kDataLoss), 6);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kCorruption), 7);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kIoError), 8);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kResourceExhausted), 9);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kFailedPrecondition), 10);
  EXPECT_EQ(static_cast<uint16_t>(StatusCode::kInternal), 11);
  EXPECT_EQ(kMaxStatusCode, 11);
}

TEST(StatusTest, EveryCodeHasItsOwnName) {
  std::set<std::string_view> names;
  for (uint16_t c = 0; c <= kMaxStatusCode; ++c) {
    std::string_view name = StatusCodeName(static_cast<StatusCode>(c));
    EXPECT_NE(name, "UNKNOWN") << c;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), size_t{kMaxStatusCode} + 1);
  EXPECT_EQ(StatusCodeName(static_cast<StatusCode>(kMaxStatusCode + 1)), "UNKNOWN");
}

TEST(StatusTest, HelpersSetTheirCode) {
  const std::vector<std::pair<Status, StatusCode>> cases = {
      {InvalidArgument("m"), StatusCode::kInvalidArgument},
      {NotFound("m"), StatusCode::kNotFound},
      {AlreadyExists("m"), StatusCode::kAlreadyExists},
      {PermissionDenied("m"), StatusCode::kPermissionDenied},
      {Unavailable("m"), StatusCode::kUnavailable},
      {DataLoss("m"), StatusCode::kDataLoss},
      {Corruption("m"), StatusCode::kCorruption},
      {IoError("m"), StatusCode::kIoError},
      {ResourceExhausted("m"), StatusCode::kResourceExhausted},
      {FailedPrecondition("m"), StatusCode::kFailedPrecondition},
      {Internal("m"), StatusCode::kInternal},
  };
  for (const auto& [status, code] : cases) {
    EXPECT_FALSE(status.ok());
    EXPECT_EQ(status.code(), code);
    EXPECT_EQ(status.message(), "m");
  }
}

TEST(StatusTest, ToString) {
  EXPECT_EQ(Status::Ok().ToString(), "OK");
  EXPECT_EQ(Status().ToString(), "OK");
  EXPECT_EQ(NotFound("region \"x\"").ToString(), "NOT_FOUND: region \"x\"");
  EXPECT_EQ(Status(StatusCode::kInternal, "").ToString(), "INTERNAL");
  EXPECT_EQ(Corruption("bad magic").ToString(), "CORRUPTION: bad magic");
}

TEST(StatusTest, Equality) {
  EXPECT_EQ(NotFound("a"), NotFound("a"));
  EXPECT_FALSE(NotFound("a") == NotFound("b"));
  EXPECT_FALSE(NotFound("a") == Internal("a"));
  EXPECT_EQ(Status(), Status::Ok());
}

Result<int> Half(int x) {
  if (x % 2 != 0) return InvalidArgument(std::to_string(x) + " is odd");
  return x / 2;
}

int quarter_finished = 0;

Result<int> Quarter(int x) {
  DSVM_ASSIGN_OR_RETURN(int half, Half(x));
  DSVM_ASSIGN_OR_RETURN(int quarter, Half(half));
  ++quarter_finished;
  return quarter;
}

Status CheckEven(int x) {
  DSVM_RETURN_IF_ERROR(Half(x).status());
  return Status::Ok();
}

TEST(ResultTest, HoldsAValueOrAStatus) {
  Result<std::string> v = std::string("page");
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v.status().ok());
  EXPECT_EQ(*v, "page");
  EXPECT_EQ(v->size(), 4u);
  std::string moved = std::move(v).value();
  EXPECT_EQ(moved, "page");

  Result<std::string> e = Unavailable("shard 2 down");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(e.status().message(), "shard 2 down");
}

TEST(ResultTest, AssignOrReturnPropagatesTheFirstError) {
  quarter_finished = 0;
  Result<int> ok = Quarter(12);
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(*ok, 3);
  EXPECT_EQ(quarter_finished, 1);

  Result<int> first = Quarter(7);
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.status(), InvalidArgument("7 is odd"));

  Result<int> second = Quarter(6);  // 6 / 2 = 3, odd on the second step
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status(), InvalidArgument("3 is odd"));
  EXPECT_EQ(quarter_finished, 1);  // neither error path reached the end
}

TEST(ResultTest, ReturnIfErrorPropagates) {
  EXPECT_TRUE(CheckEven(4).ok());
  EXPECT_EQ(CheckEven(5), InvalidArgument("5 is odd"));
}

TEST(ResultDeathTest, MisuseCrashes) {
  EXPECT_DEATH(
      {
        Result<int> r = Status::Ok();
        (void)r;
      },
      "OK Status");
  EXPECT_DEATH(
      {
        Result<int> r = NotFound("gone");
        (void)r.value();
      },
      "NOT_FOUND: gone");
  EXPECT_DEATH(DSVM_CHECK_MSG(1 + 1 == 3, "arithmetic"), "CHECK failed.*arithmetic");
}

}  // namespace
}  // namespace dsvm
