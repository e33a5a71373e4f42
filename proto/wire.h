// Field writer and reader shared by the wire codec (messages.cc) and the
// coordinator's stored records: one Visit() per struct lists its fields once,
// and the same list encodes and decodes, so the two cannot drift apart.
#ifndef DSVM_PROTO_WIRE_H_
#define DSVM_PROTO_WIRE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "proto/status.h"

namespace dsvm::proto {

// Writes fields little-endian. Bounds are the encoder's promise to the
// decoder: exceeding one is a programmer error, not bad input.
class Writer {
 public:
  explicit Writer(std::vector<uint8_t>* out) : out_(out) {}
  void U8(uint8_t v) { out_->push_back(v); }
  void U16(uint16_t v) { Put(v, 2); }
  void U32(uint32_t v) { Put(v, 4); }
  void U64(uint64_t v) { Put(v, 8); }
  void Flag(uint8_t v) { U8(v); }
  void Code(uint16_t v) { U16(v); }
  template <typename E> void Enum(E v, uint8_t) { U8(static_cast<uint8_t>(v)); }
  void Str(const std::string& s, uint32_t bound) {
    DSVM_CHECK_MSG(s.size() <= bound, "string field over its bound");
    U32(static_cast<uint32_t>(s.size()));
    out_->insert(out_->end(), s.begin(), s.end());
  }
  void Blob(const std::vector<uint8_t>& b, uint32_t bound) {
    DSVM_CHECK_MSG(b.size() <= bound, "blob field over its bound");
    U32(static_cast<uint32_t>(b.size()));
    out_->insert(out_->end(), b.begin(), b.end());
  }
  void U32List(const std::vector<uint32_t>& l, uint32_t bound) {
    DSVM_CHECK_MSG(l.size() <= bound, "list field over its bound");
    U32(static_cast<uint32_t>(l.size()));
    for (uint32_t v : l) U32(v);
  }
  template <typename T> void List(const std::vector<T>& l, uint32_t bound) {
    DSVM_CHECK_MSG(l.size() <= bound, "list field over its bound");
    U32(static_cast<uint32_t>(l.size()));
    for (const T& e : l) const_cast<T&>(e).Visit(*this);
  }

 private:
  void Put(uint64_t v, int n) {
    uint8_t bytes[8];
    for (int i = 0; i < n; ++i) bytes[i] = static_cast<uint8_t>(v >> (8 * i));
    out_->insert(out_->end(), bytes, bytes + n);  // one capacity check, not n
  }
  std::vector<uint8_t>* out_;
};

// What Reader and Checker share: the rules a field's value must meet, and
// the first failure, which sticks.
class FieldRules {
 public:
  // For a Visit() that finds a value it cannot decode further.
  void Refuse(std::string why) { Fail(std::move(why)); }

  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }

 protected:
  void CheckFlag(uint8_t v) {
    if (v > 1) Fail("flag is not 0 or 1");
  }
  void CheckCode(uint16_t v) {
    if (v > kMaxStatusCode) Fail("status code out of range");
  }
  // Enums are stored in one byte; 0 is never a valid value.
  void CheckEnum(uint8_t raw, uint8_t max) {
    if (raw == 0 || raw > max) Fail("enum value " + std::to_string(raw) + " out of range");
  }
  // A string's or blob's length; Checker's list sizes too (Reader checks
  // a list's count itself, against the bytes left as well).
  void CheckLength(size_t n, uint32_t bound) {
    if (n > bound) Fail("length " + std::to_string(n) + " over bound " + std::to_string(bound));
  }
  void Fail(std::string why) {
    if (ok_) error_ = std::move(why);
    ok_ = false;
  }

  bool ok_ = true;

 private:
  std::string error_;
};

// Applies the Reader's rules to values in memory, without encoding them:
// flags 0 or 1, status codes and enums (as the Writer stores them, one
// byte) in range, strings, blobs and lists within their bounds. A record
// that passes decodes again with DecodeFields once written. Not a check of
// whole messages: Decode also runs Validate(), and a Visit() may check more
// when its visitor is a Reader (PageRun's).
class Checker : public FieldRules {
 public:
  void U8(uint8_t) {}
  void U16(uint16_t) {}
  void U32(uint32_t) {}
  void U64(uint64_t) {}
  void Flag(uint8_t v) { CheckFlag(v); }
  void Code(uint16_t v) { CheckCode(v); }
  template <typename E> void Enum(E v, uint8_t max) { CheckEnum(static_cast<uint8_t>(v), max); }
  void Str(const std::string& s, uint32_t bound) { CheckLength(s.size(), bound); }
  void Blob(const std::vector<uint8_t>& b, uint32_t bound) { CheckLength(b.size(), bound); }
  void U32List(const std::vector<uint32_t>& l, uint32_t bound) { CheckLength(l.size(), bound); }
  template <typename T> void List(std::vector<T>& l, uint32_t bound) {
    CheckLength(l.size(), bound);
    for (T& e : l) e.Visit(*this);
  }
};

// Reads fields little-endian. The first failure sticks: later reads return
// zeros, and error() reports the first problem.
class Reader : public FieldRules {
 public:
  explicit Reader(std::span<const uint8_t> in) : in_(in) {}
  void U8(uint8_t& v) { v = static_cast<uint8_t>(Get(1)); }
  void U16(uint16_t& v) { v = static_cast<uint16_t>(Get(2)); }
  void U32(uint32_t& v) { v = static_cast<uint32_t>(Get(4)); }
  void U64(uint64_t& v) { v = Get(8); }
  void Flag(uint8_t& v) {
    U8(v);
    CheckFlag(v);
  }
  void Code(uint16_t& v) {
    U16(v);
    CheckCode(v);
  }
  template <typename E> void Enum(E& v, uint8_t max) {
    uint8_t raw = 0;
    U8(raw);
    CheckEnum(raw, max);
    v = static_cast<E>(raw);
  }
  void Str(std::string& s, uint32_t bound) {
    uint32_t n = Length(bound);
    if (!ok_) return;
    s.assign(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
  }
  void Blob(std::vector<uint8_t>& b, uint32_t bound) {
    uint32_t n = Length(bound);
    if (!ok_) return;
    b.assign(in_.begin() + pos_, in_.begin() + pos_ + n);
    pos_ += n;
  }
  void U32List(std::vector<uint32_t>& l, uint32_t bound) {
    uint32_t n = 0;
    U32(n);
    if (!ok_) return;
    if (n > bound) return Fail("list of " + std::to_string(n) + " over bound");
    if (uint64_t{n} * 4 > in_.size() - pos_) return Fail("list overruns the payload");
    l.resize(n);
    for (auto& v : l) U32(v);
  }
  // Each element takes at least one byte, so a count larger than the bytes
  // left is refused before anything is allocated.
  template <typename T> void List(std::vector<T>& l, uint32_t bound) {
    uint32_t n = 0;
    U32(n);
    if (!ok_) return;
    if (n > bound) return Fail("list of " + std::to_string(n) + " over bound");
    if (n > in_.size() - pos_) return Fail("list overruns the payload");
    l.resize(n);
    for (auto& e : l) {
      e.Visit(*this);
      if (!ok_) return;
    }
  }

  bool at_end() const { return pos_ == in_.size(); }

 private:
  uint32_t Length(uint32_t bound) {
    uint32_t n = 0;
    U32(n);
    if (!ok_) return 0;
    CheckLength(n, bound);
    if (!ok_) return 0;
    if (n > in_.size() - pos_) {
      Fail("length " + std::to_string(n) + " overruns the payload");
      return 0;
    }
    return n;
  }
  uint64_t Get(int n) {
    if (!ok_) return 0;
    if (in_.size() - pos_ < static_cast<size_t>(n)) {
      Fail("payload too short");
      return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t{in_[pos_ + i]} << (8 * i);
    pos_ += n;
    return v;
  }

  std::span<const uint8_t> in_;
  size_t pos_ = 0;
};

// Encodes a struct with a Visit() method (no header).
template <typename T>
std::vector<uint8_t> EncodeFields(const T& value) {
  std::vector<uint8_t> out;
  Writer w(&out);
  const_cast<T&>(value).Visit(w);
  return out;
}

// Decodes a struct with a Visit() method; the bytes must be consumed exactly.
template <typename T>
Status DecodeFields(std::span<const uint8_t> bytes, T* value) {
  Reader r(bytes);
  value->Visit(r);
  if (!r.ok()) return Corruption(r.error());
  if (!r.at_end()) return Corruption("trailing bytes");
  return Status::Ok();
}

}  // namespace dsvm::proto

#endif  // DSVM_PROTO_WIRE_H_
