// libFuzzer target: proto::DecodeHeader on the first kHeaderSize bytes, then
// proto::DecodePayload on the rest, the way a stream reader uses them.
//
// Properties checked on every input:
//   - DecodeHeader refuses anything but exactly kHeaderSize bytes;
//   - refusals carry the codes DecodeHeader and DecodePayload document;
//   - an accepted header is within its type's payload bound;
//   - the two-step path agrees with Decode on the whole input, and a payload
//     it accepts re-encodes to exactly the input bytes.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "proto/messages.h"

namespace {

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "fuzz_decode_header: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dsvm::proto;
  using dsvm::StatusCode;
  const std::span<const uint8_t> input(data, size);
  const dsvm::Result<Frame> whole = Decode(input);

  const std::span<const uint8_t> head = input.first(std::min(size, kHeaderSize));
  dsvm::Result<Header> header = DecodeHeader(head);
  if (!header.ok()) {
    StatusCode c = header.status().code();
    if (c != StatusCode::kCorruption && c != StatusCode::kInvalidArgument) {
      Die("header refused with an undocumented code");
    }
    if (whole.ok()) Die("Decode accepted a frame whose header DecodeHeader refuses");
    return 0;
  }
  if (head.size() != kHeaderSize) Die("accepted a header that is not kHeaderSize bytes");
  if (header->magic != kMagic || header->version != kWireVersion) Die("bad header accepted");
  const uint32_t bound =
      header->type == MessageType::kPageData ? kMaxDataPayload : kMaxControlPayload;
  if (header->payload_length > bound) Die("payload_length over its bound accepted");

  dsvm::Result<Message> message = DecodePayload(*header, input.subspan(kHeaderSize));
  if (!message.ok()) {
    if (message.status().code() != StatusCode::kCorruption) {
      std::fprintf(stderr, "refused with %s\n", message.status().ToString().c_str());
      Die("payload refused with a code other than kCorruption");
    }
    if (whole.ok()) Die("Decode accepted a frame DecodePayload refuses");
    return 0;
  }
  if (!whole.ok()) Die("DecodeHeader + DecodePayload accepted a frame Decode refuses");
  if (TypeOf(*message) != header->type) Die("message type differs from header");
  std::vector<uint8_t> again = Encode(*message, header->request_id);
  if (again.size() != size || std::memcmp(again.data(), data, size) != 0) {
    Die("re-encoding differs from the accepted input");
  }
  return 0;
}
