// Passing file descriptors over a UNIX socket (SCM_RIGHTS).
//
// Clients hand the node daemon their fault descriptor (a userfaultfd, later
// a /dev/dsvm file) and a pidfd of themselves over the daemon's UNIX socket;
// the daemon hands clients a region's memfd the same way. A message carries
// at least one byte of payload (the descriptors ride on it) and at most
// kMaxPassedFds descriptors. Use SOCK_SEQPACKET, where one message is one
// record; on a stream socket the descriptors arrive with the first byte of
// the payload and the caller frames the rest.
#ifndef DSVM_NODE_FAULT_FD_PASSING_H_
#define DSVM_NODE_FAULT_FD_PASSING_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "node/memory/unique_fd.h"
#include "proto/status.h"

namespace dsvm::node {

inline constexpr size_t kMaxPassedFds = 8;

// Sends `payload` with duplicates of `fds` (the caller keeps its own). Blocks
// on a blocking socket until the whole payload is sent. Errors:
// kInvalidArgument (empty payload, more than kMaxPassedFds, a negative fd),
// kUnavailable (the peer closed, or a non-blocking socket is full),
// kIoError.
Status SendFds(int socket, std::span<const uint8_t> payload, std::span<const int> fds);

struct ReceivedFds {
  size_t bytes = 0;           // payload bytes received
  std::vector<UniqueFd> fds;  // close-on-exec, owned by the receiver
};

// Receives one message into `payload` and the descriptors riding on it.
// Errors: kUnavailable (the peer closed: end of stream, or nothing to read
// on a non-blocking socket), kInvalidArgument (the sender passed more than
// kMaxPassedFds descriptors or the payload did not fit: the message is
// refused and every descriptor that came with it closed), kIoError.
Result<ReceivedFds> ReceiveFds(int socket, std::span<uint8_t> payload);

// The process a client's passed pidfd names, checked against the pid its
// socket's credentials (SO_PEERCRED) give (`claimed`; 0: none): the pid to
// track the client by. Errors: kInvalidArgument (not a pidfd, or it names
// another process), kUnavailable (the process has exited).
Result<pid_t> CheckClientPidfd(int pidfd, pid_t claimed);

}  // namespace dsvm::node

#endif  // DSVM_NODE_FAULT_FD_PASSING_H_
