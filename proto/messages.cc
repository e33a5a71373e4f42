#include "proto/messages.h"

#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "proto/wire.h"

namespace dsvm::proto {
namespace {

uint32_t MaxPayloadFor(MessageType t) {
  return t == MessageType::kPageData ? kMaxDataPayload : kMaxControlPayload;
}

// Builds the variant alternative whose kType matches `t`, or returns false.
template <size_t I = 0>
bool MakeOfType(MessageType t, Message* m) {
  if constexpr (I == std::variant_size_v<Message>) {
    return false;
  } else {
    using Alt = std::variant_alternative_t<I, Message>;
    if (Alt::kType == t) {
      m->template emplace<I>();
      return true;
    }
    return MakeOfType<I + 1>(t, m);
  }
}

// Values a decoded message must also satisfy, beyond what its fields'
// codec checks; a type without a Validate() has none.
template <typename T>
Status ValidateValues(const T& m) {
  if constexpr (requires { m.Validate(); }) {
    return m.Validate();
  } else {
    return Status::Ok();
  }
}

void PutLe(std::vector<uint8_t>* out, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) (*out)[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace

Status RegionDeleted::Validate() const {
  if (region == 0) return Corruption("region 0");
  if (size == 0) return Corruption("size 0");
  if (base % kMinPageSize != 0 || size % kMinPageSize != 0) {
    return Corruption("base or size not a multiple of " + std::to_string(kMinPageSize));
  }
  if (base + size < base) return Corruption("base + size wraps");
  return Status::Ok();
}

Status Acquire::Validate() const {
  if (region == 0) return Corruption("Acquire names no region (region 0)");
  return Status::Ok();
}

Status ReadDirect::Validate() const {
  if (region == 0) return Corruption("ReadDirect names no region (region 0)");
  if (page % kMinPageSize != 0) return Corruption("ReadDirect of a page not aligned to " + std::to_string(kMinPageSize));
  return Status::Ok();
}

Status RegionCreated::Validate() const {
  if (region == 0) return Corruption("region 0");
  if (name.empty()) return Corruption("empty region name");
  if (page_size != kMinPageSize && page_size != 65536 && page_size != kMaxPageSize) {
    return Corruption("page size " + std::to_string(page_size) + " is not 4096, 65536 or 2097152");
  }
  if (size == 0) return Corruption("size 0");
  if (base % page_size != 0 || size % page_size != 0) {
    return Corruption("base or size not a multiple of the page size " + std::to_string(page_size));
  }
  if (base + size < base) return Corruption("base + size wraps");
  return Status::Ok();
}

namespace {

Status ValidateRange(PageAddr address, uint64_t length) {
  if (length == 0) return Corruption("length 0");
  if (address % kMinPageSize != 0 || length % kMinPageSize != 0) {
    return Corruption("address or length not a multiple of " + std::to_string(kMinPageSize));
  }
  if (address + length < address) return Corruption("address + length wraps");
  return Status::Ok();
}

}  // namespace

Status GpuMap::Validate() const { return ValidateRange(address, length); }

Status GpuUnmap::Validate() const { return ValidateRange(address, length); }

Status GpuPrefetch::Validate() const { return ValidateRange(address, length); }

uint64_t PageBatch::TotalBytes() const {
  uint64_t total = 0;
  for (const BatchedPage& p : pages) total += p.length;
  return total;
}

Status PageBatch::Validate() const {
  if (pages.empty()) return Corruption("a page batch without pages");
  for (const BatchedPage& p : pages) {
    if (p.length == 0 || p.length % kMinPageSize != 0 || p.length > kMaxPageSize) {
      return Corruption("a batched page of " + std::to_string(p.length) + " bytes");
    }
  }
  if (TotalBytes() > kMaxBatchBytes) {
    return Corruption("a page batch of " + std::to_string(TotalBytes()) + " bytes");
  }
  return Status::Ok();
}

Status GpuMapReply::Validate() const {
  if (arena == 0) return Corruption("arena 0");
  if (length == 0) return Corruption("length 0");
  if (offset > arena_bytes || length > arena_bytes - offset) {
    return Corruption("range past the end of the arena");
  }
  if (kind == DeviceKind::kCuda ? ipc_handle.size() != kCudaIpcHandleSize : !ipc_handle.empty()) {
    return Corruption("ipc handle of " + std::to_string(ipc_handle.size()) +
                      " bytes does not match the device kind");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// PageRun

namespace {

// The request_seq of the run item types that carry one.
template <typename T>
constexpr bool kHasSeq = requires(T t) { t.request_seq; };

}  // namespace

MessageType PageRun::ItemType(const Item& item) {
  return std::visit([](const auto& x) { return std::decay_t<decltype(x)>::kType; }, item);
}

bool PageRun::MakeItem(MessageType t, Item* item) {
  bool made = false;
  [&]<size_t... I>(std::index_sequence<I...>) {
    ((std::variant_alternative_t<I, Item>::kType == t ? (item->emplace<I>(), made = true) : false),
     ...);
  }(std::make_index_sequence<std::variant_size_v<Item>>());
  return made;
}

namespace {

// Whether a run of `count` messages from `first` at these strides stays
// below 2^64 in page and request_seq, and names a request_seq stride only
// for a type that has one: the rule both the packer and the decoder apply.
Status CheckSpan(const PageRun::Item& first, uint64_t count, uint64_t page_stride,
                 uint64_t seq_stride) {
  return std::visit(
      [&](const auto& x) -> Status {
        if (x.page + (count - 1) * page_stride < x.page) return Corruption("a run's last page wraps");
        if constexpr (kHasSeq<std::decay_t<decltype(x)>>) {
          if (x.request_seq + (count - 1) * seq_stride < x.request_seq) {
            return Corruption("a run's last request_seq wraps");
          }
        } else if (seq_stride != 0) {
          return Corruption(std::string("a run of ") + TypeName(x.kType) +
                            " with a request_seq stride");
        }
        return Status::Ok();
      },
      first);
}

}  // namespace

Status PageRun::Validate() const {
  if (count < 2 || count > kMaxRunPages) {
    return Corruption("a run of " + std::to_string(count) + " messages (2 to " +
                      std::to_string(kMaxRunPages) + ")");
  }
  if (page_stride == 0 || page_stride % kMinPageSize != 0 || page_stride > kMaxPageSize) {
    return Corruption("a run's page stride of " + std::to_string(page_stride) + " bytes");
  }
  DSVM_RETURN_IF_ERROR(CheckSpan(first, count, page_stride, seq_stride));
  return std::visit([](const auto& x) { return ValidateValues(x); }, first);
}

std::optional<PageRun::Item> PageRunItemOf(const Message& m) {
  return std::visit(
      [](const auto& x) -> std::optional<PageRun::Item> {
        using T = std::decay_t<decltype(x)>;
        if constexpr (requires(PageRun::Item i) { i = x; } && !std::is_same_v<T, PageRun>) {
          return x;
        } else {
          return std::nullopt;
        }
      },
      m);
}

Message PageRunAt(const PageRun& run, uint32_t i) {
  DSVM_CHECK(i < run.count);
  return std::visit(
      [&](const auto& x) -> Message {
        auto m = x;
        m.page += uint64_t{i} * run.page_stride;
        if constexpr (kHasSeq<decltype(m)>) m.request_seq += uint64_t{i} * run.seq_stride;
        return m;
      },
      run.first);
}

namespace {

PageAddr ItemPage(const PageRun::Item& item) {
  return std::visit([](const auto& x) { return x.page; }, item);
}

// Whether message `i` of `run` (i < count) is for `page`.
bool Covers(const PageRun& run, PageAddr page) {
  const PageAddr first = ItemPage(run.first);
  if (page < first) return false;
  if (run.count == 1) return page == first;
  return (page - first) % run.page_stride == 0 && (page - first) / run.page_stride < run.count;
}

// Adds `item` to `run` if it is the run's next message: same type, every
// field but the page and request_seq equal, those a stride on (the second
// message sets the strides), and the run no longer than the decoder takes.
bool TryGrow(PageRun* run, const PageRun::Item& item) {
  if (run->count >= kMaxRunPages || item.index() != run->first.index()) return false;
  return std::visit(
      [&](const auto& first) {
        using T = std::decay_t<decltype(first)>;
        const T& next = std::get<T>(item);
        uint64_t stride = run->page_stride;
        uint64_t seq_stride = run->seq_stride;
        if (run->count == 1) {
          stride = next.page - first.page;
          if (next.page <= first.page || stride % kMinPageSize != 0 || stride > kMaxPageSize) {
            return false;
          }
          if constexpr (kHasSeq<T>) seq_stride = next.request_seq - first.request_seq;
          if (seq_stride > 1) return false;
        }
        if (!CheckSpan(run->first, uint64_t{run->count} + 1, stride, seq_stride).ok()) return false;
        T same = next;  // equal to `first` if `next` is the run's next message
        if (next.page != first.page + run->count * stride) return false;
        same.page = first.page;
        if constexpr (kHasSeq<T>) {
          if (next.request_seq != first.request_seq + run->count * seq_stride) return false;
          same.request_seq = first.request_seq;
        }
        if (!(same == first)) return false;
        run->page_stride = static_cast<uint32_t>(stride);
        run->seq_stride = static_cast<uint8_t>(seq_stride);
        ++run->count;
        return true;
      },
      run->first);
}

void EncodeRun(const PageRun& run, std::vector<uint8_t>* out) {
  if (run.count == 1) {
    std::visit([&](const auto& x) { EncodeTo(Message(x), 0, out); }, run.first);
  } else {
    EncodeTo(run, 0, out);
  }
}

}  // namespace

void RunPacker::Add(const Message& m, uint64_t request_id, std::vector<uint8_t>* out) {
  std::optional<PageRun::Item> item;
  if (request_id == 0) item = PageRunItemOf(m);
  if (!item) {
    Finish(out);
    EncodeTo(m, request_id, out);
    return;
  }
  // A page's messages keep their order: one for a page that a run of
  // another type holds waits until every open run has gone.
  const PageAddr page = ItemPage(*item);
  for (const PageRun& run : open_) {
    if (run.first.index() != item->index() && Covers(run, page)) {
      Finish(out);
      break;
    }
  }
  for (size_t i = 0; i < open_.size(); ++i) {
    if (open_[i].first.index() != item->index()) continue;
    if (TryGrow(&open_[i], *item)) {
      if (open_[i].count == kMaxRunPages) {
        EncodeRun(open_[i], out);
        open_.erase(open_.begin() + static_cast<std::ptrdiff_t>(i));
      }
      return;
    }
    EncodeRun(open_[i], out);  // the run of this type ends here
    open_.erase(open_.begin() + static_cast<std::ptrdiff_t>(i));
    break;
  }
  open_.push_back(PageRun{.count = 1, .page_stride = 0, .seq_stride = 0, .first = std::move(*item)});
}

void RunPacker::Finish(std::vector<uint8_t>* out) {
  for (const PageRun& run : open_) EncodeRun(run, out);
  open_.clear();
}

MessageType TypeOf(const Message& m) {
  return std::visit([](const auto& x) { return std::decay_t<decltype(x)>::kType; }, m);
}

const char* TypeName(MessageType t) {
  switch (t) {
    case MessageType::kInvalid: return "Invalid";
    case MessageType::kStatusReply: return "StatusReply";
    case MessageType::kJoinRequest: return "JoinRequest";
    case MessageType::kJoinReply: return "JoinReply";
    case MessageType::kHeartbeat: return "Heartbeat";
    case MessageType::kLeaveRequest: return "LeaveRequest";
    case MessageType::kRegionCreate: return "RegionCreate";
    case MessageType::kRegionOpen: return "RegionOpen";
    case MessageType::kRegionDelete: return "RegionDelete";
    case MessageType::kRegionReply: return "RegionReply";
    case MessageType::kPageQuery: return "PageQuery";
    case MessageType::kPageQueryReply: return "PageQueryReply";
    case MessageType::kNodeList: return "NodeList";
    case MessageType::kNodeListReply: return "NodeListReply";
    case MessageType::kRegionList: return "RegionList";
    case MessageType::kRegionListReply: return "RegionListReply";
    case MessageType::kAcquire: return "Acquire";
    case MessageType::kGrant: return "Grant";
    case MessageType::kFetch: return "Fetch";
    case MessageType::kInvalidate: return "Invalidate";
    case MessageType::kInvalidateAck: return "InvalidateAck";
    case MessageType::kDone: return "Done";
    case MessageType::kRelease: return "Release";
    case MessageType::kEvictReply: return "EvictReply";
    case MessageType::kPageData: return "PageData";
    case MessageType::kPeerHello: return "PeerHello";
    case MessageType::kClientHello: return "ClientHello";
    case MessageType::kClientHelloReply: return "ClientHelloReply";
    case MessageType::kMapRegion: return "MapRegion";
    case MessageType::kUnmapRegion: return "UnmapRegion";
    case MessageType::kNodeStats: return "NodeStats";
    case MessageType::kNodeStatsReply: return "NodeStatsReply";
    case MessageType::kPrefetch: return "Prefetch";
    case MessageType::kAdvise: return "Advise";
    case MessageType::kAuthHello: return "AuthHello";
    case MessageType::kAuthChallenge: return "AuthChallenge";
    case MessageType::kAuthProof: return "AuthProof";
    case MessageType::kPeerChallenge: return "PeerChallenge";
    case MessageType::kPeerProof: return "PeerProof";
    case MessageType::kRegionPages: return "RegionPages";
    case MessageType::kRegionPagesReply: return "RegionPagesReply";
    case MessageType::kRegionDeleted: return "RegionDeleted";
    case MessageType::kRegionWatch: return "RegionWatch";
    case MessageType::kRegionCreated: return "RegionCreated";
    case MessageType::kRegionSnapshotDone: return "RegionSnapshotDone";
    case MessageType::kGpuMap: return "GpuMap";
    case MessageType::kGpuMapReply: return "GpuMapReply";
    case MessageType::kGpuUnmap: return "GpuUnmap";
    case MessageType::kGpuPrefetch: return "GpuPrefetch";
    case MessageType::kPageBatch: return "PageBatch";
    case MessageType::kPageRun: return "PageRun";
    case MessageType::kReadDirect: return "ReadDirect";
  }
  return "Unknown";
}

void EncodeTo(const Message& m, uint64_t request_id, std::vector<uint8_t>* out) {
  size_t start = out->size();
  out->resize(start + kHeaderSize);
  Writer w(out);
  std::visit([&w](const auto& x) { const_cast<std::decay_t<decltype(x)>&>(x).Visit(w); }, m);
  size_t payload = out->size() - start - kHeaderSize;
  DSVM_CHECK(payload <= MaxPayloadFor(TypeOf(m)));
  PutLe(out, start + 0, kMagic, 4);
  PutLe(out, start + 4, kWireVersion, 2);
  PutLe(out, start + 6, static_cast<uint16_t>(TypeOf(m)), 2);
  PutLe(out, start + 8, payload, 4);
  PutLe(out, start + 12, 0, 4);
  PutLe(out, start + 16, request_id, 8);
}

std::vector<uint8_t> Encode(const Message& m, uint64_t request_id) {
  std::vector<uint8_t> out;
  EncodeTo(m, request_id, &out);
  return out;
}

Result<Header> DecodeHeader(std::span<const uint8_t> bytes) {
  if (bytes.size() != kHeaderSize) return Corruption("header must be 24 bytes");
  auto le = [&](size_t at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t{bytes[at + i]} << (8 * i);
    return v;
  };
  Header h;
  h.magic = static_cast<uint32_t>(le(0, 4));
  h.version = static_cast<uint16_t>(le(4, 2));
  h.type = static_cast<MessageType>(le(6, 2));
  h.payload_length = static_cast<uint32_t>(le(8, 4));
  uint32_t reserved = static_cast<uint32_t>(le(12, 4));
  h.request_id = le(16, 8);
  if (h.magic != kMagic) return Corruption("bad magic: not a dsvm message");
  if (h.version != kWireVersion) {
    return InvalidArgument("wire version " + std::to_string(h.version) + " not supported (want " +
                           std::to_string(kWireVersion) + ")");
  }
  Message probe;
  if (!MakeOfType(h.type, &probe)) {
    return InvalidArgument("unknown message type " + std::to_string(static_cast<int>(h.type)));
  }
  if (reserved != 0) return Corruption("reserved header bits set");
  if (h.payload_length > MaxPayloadFor(h.type)) {
    return Corruption(std::string(TypeName(h.type)) + " payload of " +
                      std::to_string(h.payload_length) + " bytes over its bound");
  }
  return h;
}

Result<Message> DecodePayload(const Header& header, std::span<const uint8_t> payload) {
  if (payload.size() != header.payload_length) return Corruption("payload length mismatch");
  Message m;
  if (!MakeOfType(header.type, &m)) return InvalidArgument("unknown message type");
  Reader r(payload);
  std::visit([&r](auto& x) { x.Visit(r); }, m);
  if (!r.ok()) return Corruption(std::string(TypeName(header.type)) + ": " + r.error());
  if (!r.at_end()) return Corruption(std::string(TypeName(header.type)) + ": trailing bytes");
  Status valid = std::visit([](const auto& x) { return ValidateValues(x); }, m);
  if (!valid.ok()) return Corruption(std::string(TypeName(header.type)) + ": " + valid.message());
  return m;
}

Result<Frame> Decode(std::span<const uint8_t> bytes) {
  if (bytes.size() < kHeaderSize) return Corruption("frame shorter than a header");
  DSVM_ASSIGN_OR_RETURN(Header h, DecodeHeader(bytes.subspan(0, kHeaderSize)));
  auto payload = bytes.subspan(kHeaderSize);
  if (payload.size() != h.payload_length) {
    return Corruption("frame of " + std::to_string(bytes.size()) + " bytes, header says " +
                      std::to_string(kHeaderSize + h.payload_length));
  }
  DSVM_ASSIGN_OR_RETURN(Message m, DecodePayload(h, payload));
  return Frame{h, std::move(m)};
}

}  // namespace dsvm::proto
