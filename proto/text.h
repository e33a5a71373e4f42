// Small text helpers shared by every part's error messages.
#ifndef DSVM_PROTO_TEXT_H_
#define DSVM_PROTO_TEXT_H_

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <string>

namespace dsvm {

// An address or other 64-bit value as "0x..." (lower-case hex).
inline std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

}  // namespace dsvm

#endif  // DSVM_PROTO_TEXT_H_
