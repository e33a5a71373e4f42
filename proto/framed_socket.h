// FramedSocket: a blocking TCP connection that carries proto frames.
//
// For tools, tests and benchmarks that talk to a coordinator (dsvmctl,
// dsvm-bench, integration tests). Servers use their own asynchronous loop;
// this is the simple client side. Every received frame is fully validated
// (proto::Decode) before it is returned.
#ifndef DSVM_PROTO_FRAMED_SOCKET_H_
#define DSVM_PROTO_FRAMED_SOCKET_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "proto/messages.h"

namespace dsvm::proto {

class FramedSocket {
 public:
  FramedSocket() = default;
  ~FramedSocket();
  FramedSocket(FramedSocket&& other) noexcept;
  FramedSocket& operator=(FramedSocket&& other) noexcept;
  FramedSocket(const FramedSocket&) = delete;
  FramedSocket& operator=(const FramedSocket&) = delete;

  // "host:port" with a numeric IPv4 host or "localhost". Errors:
  // kInvalidArgument (bad address), kUnavailable (refused, unreachable).
  static Result<FramedSocket> Connect(const std::string& address) { return Connect(address, -1); }
  // As above, giving up after timeout_ms (< 0: whenever the kernel does)
  // with kUnavailable: a peer that does not answer does not hold the caller
  // for the minutes of TCP's own retries.
  static Result<FramedSocket> Connect(const std::string& address, int timeout_ms);

  // Buffers a frame; Flush() writes everything buffered. Consecutive
  // coherence messages go as PageRun frames where they line up (RunPacker).
  void Queue(const Message& m, uint64_t request_id);
  Status Flush();
  Status Send(const Message& m, uint64_t request_id) {
    Queue(m, request_id);
    return Flush();
  }

  // Writes bytes as they are, unframed: for tests that probe a peer's
  // validation with malformed input.
  Status SendRaw(const std::vector<uint8_t>& bytes) {
    packer_.Finish(&out_);
    out_.insert(out_.end(), bytes.begin(), bytes.end());
    return Flush();
  }

  // Blocks for the next frame. A PageRun comes out as its messages, one
  // frame each (the header's type is the message's); one with a request id
  // is refused (kCorruption). Errors: kUnavailable (closed by the peer),
  // kCorruption / kInvalidArgument (the peer sent a malformed frame),
  // kIoError. timeout_ms < 0 waits forever; on timeout: kUnavailable.
  Result<Frame> Receive(int timeout_ms = -1);

  // For event loops: reads whatever bytes are available without blocking.
  // Errors: kUnavailable (closed by the peer), kIoError.
  Status ReadAvailable();
  // The next complete frame already read, if any. Errors: kCorruption /
  // kInvalidArgument (malformed: close the connection).
  Result<std::optional<Frame>> NextFrame();
  int fd() const { return fd_; }
  uint64_t NextRequestId() { return next_request_id_++; }

  // Sends a request and waits for the reply with the same request_id.
  Result<Message> Call(const Message& m, int timeout_ms = 5000);

  bool is_open() const { return fd_ >= 0; }
  void Close();

 private:
  explicit FramedSocket(int fd) : fd_(fd) {}
  Status FillAtLeast(size_t n, int timeout_ms);
  // The frame to return for a decoded one: a PageRun's first message (the
  // rest wait in run_), anything else as it is. Errors: kCorruption (a run
  // with a request id).
  Result<Frame> Unpack(Frame f);
  // Drops what is buffered either way (a moved-from or closed socket).
  void ForgetBuffered();
  // Returns the next message of a run being expanded, if any.
  std::optional<Frame> NextOfRun();

  int fd_ = -1;
  uint64_t next_request_id_ = 1;
  std::vector<uint8_t> out_;
  RunPacker packer_;
  std::optional<Frame> run_;  // a received PageRun, expanded up to run_next_
  uint32_t run_next_ = 0;
  std::vector<uint8_t> in_;
  size_t in_pos_ = 0;
};

// Splits "host:port"; the port must be 1..65535.
Status ParseHostPort(const std::string& address, std::string* host, uint16_t* port);

}  // namespace dsvm::proto

#endif  // DSVM_PROTO_FRAMED_SOCKET_H_
