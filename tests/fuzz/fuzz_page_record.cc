// libFuzzer target: DecodeFields<coordinator::PageRecord>, the coordinator's
// stored page record, as read back from disk after a crash.
//
// Properties checked on every input:
//   - a refusal is kCorruption, with a message;
//   - an accepted record re-encodes (EncodeFields) to exactly the input.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "coordinator/directory/page_directory.h"
#include "proto/wire.h"

namespace {

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "fuzz_page_record: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dsvm::coordinator::PageRecord record;
  dsvm::Status s = dsvm::proto::DecodeFields(std::span<const uint8_t>(data, size), &record);
  if (!s.ok()) {
    if (s.code() != dsvm::StatusCode::kCorruption)
      Die("refused with a code other than kCorruption");
    if (s.message().empty()) Die("refusal without a message");
    return 0;
  }
  std::vector<uint8_t> again = dsvm::proto::EncodeFields(record);
  if (again.size() != size || std::memcmp(again.data(), data, size) != 0) {
    std::fprintf(stderr, "input %zu bytes, re-encoded %zu bytes\n", size, again.size());
    Die("re-encoding differs from the accepted input");
  }
  return 0;
}
