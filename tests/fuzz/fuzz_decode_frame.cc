// libFuzzer target: proto::Decode on a whole frame.
//
// Properties checked on every input:
//   - a refusal is kCorruption or kInvalidArgument, with a message;
//   - an accepted frame's message has the header's type, and re-encoding it
//     with the header's request_id gives back exactly the input bytes: the
//     codec has one encoding per message, and Decode accepts nothing else.
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
  std::fprintf(stderr, "fuzz_decode_frame: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dsvm::proto;
  dsvm::Result<Frame> frame = Decode(std::span<const uint8_t>(data, size));
  if (!frame.ok()) {
    const dsvm::Status& s = frame.status();
    if (s.code() != dsvm::StatusCode::kCorruption &&
        s.code() != dsvm::StatusCode::kInvalidArgument) {
      std::fprintf(stderr, "refused with %s\n", s.ToString().c_str());
      Die("unexpected refusal code");
    }
    if (s.message().empty()) Die("refusal without a message");
    return 0;
  }
  if (TypeOf(frame->message) != frame->header.type) Die("message type differs from header");
  if (frame->header.payload_length + kHeaderSize != size) Die("payload_length disagrees");
  std::vector<uint8_t> again = Encode(frame->message, frame->header.request_id);
  if (again.size() != size || std::memcmp(again.data(), data, size) != 0) {
    std::fprintf(stderr, "input %zu bytes, re-encoded %zu bytes, type %s\n", size, again.size(),
                 TypeName(frame->header.type));
    Die("re-encoding differs from the accepted input");
  }
  return 0;
}
