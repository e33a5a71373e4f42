// Who may join: the cluster secret and the challenge-response built on it.
//
// Every process of a cluster is given the same secret file. Whenever one
// process connects to another, each proves that it knows the secret without
// sending it: both send a fresh random nonce, and each answers with
// HMAC-SHA256(secret, role label || its peer's nonce || its own nonce). A
// proof is good for one connection only (the nonces are fresh) and for one
// direction only (the role labels differ), so it cannot be replayed or
// reflected. PROTOCOL.md, "Authentication", has the message sequence.
#ifndef DSVM_PROTO_AUTH_H_
#define DSVM_PROTO_AUTH_H_

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "proto/framed_socket.h"
#include "proto/status.h"

namespace dsvm::proto {

inline constexpr size_t kNonceSize = 32;
inline constexpr size_t kProofSize = 32;  // HMAC-SHA256
inline constexpr size_t kMinSecretSize = 16;
inline constexpr size_t kMaxSecretSize = 4096;

using Nonce = std::array<uint8_t, kNonceSize>;
using Proof = std::vector<uint8_t>;  // kProofSize bytes, or empty: "no secret here"

// Role labels: whose proof it is.
inline constexpr std::string_view kCoordinatorRole = "dsvm-v1 coordinator";
inline constexpr std::string_view kCoordinatorClientRole = "dsvm-v1 coordinator-client";
inline constexpr std::string_view kPeerListenerRole = "dsvm-v1 peer-listener";
inline constexpr std::string_view kPeerConnectorRole = "dsvm-v1 peer-connector";

class ClusterSecret {
 public:
  // Reads a secret file: a regular file readable by its owner only (like an
  // ssh key: group or other access bits are refused), of kMinSecretSize to
  // kMaxSecretSize bytes; a trailing newline is not part of the secret.
  // `deploy/make-secret.sh` writes one. Errors: kNotFound, kPermissionDenied
  // (mode), kInvalidArgument (size), kIoError.
  static Result<ClusterSecret> Load(const std::string& path);
  // Writes a new secret file at `path` (32 random bytes as 64 hex digits
  // and a newline, mode 0600; the file must not exist) and returns the
  // secret, the same one Load gives from that file. Errors: kAlreadyExists,
  // kIoError.
  static Result<ClusterSecret> Generate(const std::string& path);
  // For tests: a secret from bytes. REQUIRES: kMinSecretSize..kMaxSecretSize.
  static ClusterSecret FromBytes(std::span<const uint8_t> bytes);

  // HMAC-SHA256(secret, role || extra || theirs || mine).
  Proof Prove(std::string_view role, const Nonce& theirs, const Nonce& mine,
              std::span<const uint8_t> extra = {}) const;
  // Whether `proof` is what Prove gives (constant-time comparison).
  bool Check(const Proof& proof, std::string_view role, const Nonce& theirs, const Nonce& mine,
             std::span<const uint8_t> extra = {}) const;

 private:
  std::vector<uint8_t> bytes_;
};

// A region token as the coordinator keeps it: hex SHA-256 of the token.
std::string TokenDigest(std::string_view token);
// Whether `token` has `digest` (constant-time in the digest's bytes).
bool TokenMatches(const std::string& digest, std::string_view token);

// A nonce from the operating system's random source.
Nonce RandomNonce();

// Where a process finds its secret file: `flag` when given, else
// $DSVM_SECRET_FILE, else empty (no secret).
std::string SecretPath(const std::string& flag);

// Connects to a coordinator and authenticates both ways (AuthHello,
// AuthChallenge, AuthProof). secret == nullptr: this process has none, which
// only a coordinator started with --insecure accepts. The connect and each
// step of the handshake wait at most timeout_ms. Errors: as
// FramedSocket::Connect, and kPermissionDenied (either side lacks the
// secret, or they differ).
Result<FramedSocket> ConnectToCoordinator(const std::string& address, const ClusterSecret* secret,
                                          int timeout_ms = 5000);

}  // namespace dsvm::proto

#endif  // DSVM_PROTO_AUTH_H_
