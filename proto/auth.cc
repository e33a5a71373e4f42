#include "proto/auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>


namespace dsvm::proto {
namespace {

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

std::string HexBytes(std::span<const uint8_t> bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const uint8_t b : bytes) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

}  // namespace

Result<ClusterSecret> ClusterSecret::Load(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    const std::string why = Errno("cluster secret " + path);
    if (errno == ENOENT) return NotFound(why);
    if (errno == EACCES) return PermissionDenied(why);
    return IoError(why);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) return IoError(Errno("cluster secret " + path));
  if (!S_ISREG(st.st_mode)) return InvalidArgument("cluster secret " + path + " is not a regular file");
  if ((st.st_mode & 077) != 0) {
    return PermissionDenied("cluster secret " + path +
                            " is readable or writable by group or others; chmod 600 it");
  }
  std::vector<uint8_t> bytes(kMaxSecretSize + 2);
  size_t got = 0;
  for (;;) {
    const ssize_t n = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return IoError(Errno("reading cluster secret " + path));
    if (n == 0 || got + static_cast<size_t>(n) == bytes.size()) {
      got += static_cast<size_t>(n);
      break;
    }
    got += static_cast<size_t>(n);
  }
  if (got > 0 && bytes[got - 1] == '\n') --got;
  if (got < kMinSecretSize || got > kMaxSecretSize) {
    return InvalidArgument("cluster secret " + path + " has " + std::to_string(got) +
                           " bytes; it needs " + std::to_string(kMinSecretSize) + " to " +
                           std::to_string(kMaxSecretSize));
  }
  bytes.resize(got);
  ClusterSecret s;
  s.bytes_ = std::move(bytes);
  return s;
}

Result<ClusterSecret> ClusterSecret::Generate(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    const std::string why = Errno("creating cluster secret " + path);
    return errno == EEXIST ? AlreadyExists(why) : IoError(why);
  }
  // Hex text, not raw bytes: Load drops a trailing newline, so a raw secret
  // whose last random byte is '\n' (1 in 256) would load as a different
  // secret from the one returned here.
  std::string text = HexBytes(RandomNonce());
  ClusterSecret secret =
      FromBytes(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  text.push_back('\n');
  const ssize_t n = ::write(fd, text.data(), text.size());
  const std::string why = n < 0 ? Errno("writing cluster secret " + path)
                                : "writing cluster secret " + path + ": short write";
  ::close(fd);
  if (n != static_cast<ssize_t>(text.size())) {
    ::unlink(path.c_str());  // a partial file would make every retry kAlreadyExists
    return IoError(why);
  }
  return secret;
}

ClusterSecret ClusterSecret::FromBytes(std::span<const uint8_t> bytes) {
  DSVM_CHECK(bytes.size() >= kMinSecretSize && bytes.size() <= kMaxSecretSize);
  ClusterSecret s;
  s.bytes_.assign(bytes.begin(), bytes.end());
  return s;
}

Proof ClusterSecret::Prove(std::string_view role, const Nonce& theirs, const Nonce& mine,
                           std::span<const uint8_t> extra) const {
  std::vector<uint8_t> msg(role.begin(), role.end());
  msg.push_back(0);  // the label ends here, whatever follows
  msg.insert(msg.end(), extra.begin(), extra.end());
  msg.insert(msg.end(), theirs.begin(), theirs.end());
  msg.insert(msg.end(), mine.begin(), mine.end());
  Proof out(kProofSize);
  unsigned int len = 0;
  DSVM_CHECK(HMAC(EVP_sha256(), bytes_.data(), static_cast<int>(bytes_.size()), msg.data(),
                  msg.size(), out.data(), &len) != nullptr);
  DSVM_CHECK(len == kProofSize);
  return out;
}

bool ClusterSecret::Check(const Proof& proof, std::string_view role, const Nonce& theirs,
                          const Nonce& mine, std::span<const uint8_t> extra) const {
  if (proof.size() != kProofSize) return false;
  const Proof want = Prove(role, theirs, mine, extra);
  return CRYPTO_memcmp(proof.data(), want.data(), kProofSize) == 0;
}

std::string TokenDigest(std::string_view token) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  DSVM_CHECK(EVP_Digest(token.data(), token.size(), md, &len, EVP_sha256(), nullptr) == 1);
  return HexBytes(std::span<const uint8_t>(md, len));
}

bool TokenMatches(const std::string& digest, std::string_view token) {
  const std::string mine = TokenDigest(token);
  return digest.size() == mine.size() &&
         CRYPTO_memcmp(digest.data(), mine.data(), mine.size()) == 0;
}

Nonce RandomNonce() {
  Nonce n;
  DSVM_CHECK_MSG(RAND_bytes(n.data(), static_cast<int>(n.size())) == 1,
                 "the random source failed");
  return n;
}

std::string SecretPath(const std::string& flag) {
  if (!flag.empty()) return flag;
  const char* env = std::getenv("DSVM_SECRET_FILE");
  return env != nullptr ? env : "";
}

Result<FramedSocket> ConnectToCoordinator(const std::string& address, const ClusterSecret* secret,
                                          int timeout_ms) {
  DSVM_ASSIGN_OR_RETURN(FramedSocket sock, FramedSocket::Connect(address, timeout_ms));
  const Nonce mine = RandomNonce();
  DSVM_ASSIGN_OR_RETURN(Message reply,
                        sock.Call(AuthHello{std::vector<uint8_t>(mine.begin(), mine.end())},
                                  timeout_ms));
  if (const auto* st = std::get_if<StatusReply>(&reply)) {
    return Status(FromReply(*st).code(), "coordinator " + address + ": " + st->message);
  }
  const auto* challenge = std::get_if<AuthChallenge>(&reply);
  if (challenge == nullptr || challenge->nonce.size() != kNonceSize) {
    return PermissionDenied("coordinator " + address + " answered AuthHello with " +
                            TypeName(TypeOf(reply)) + ", not a well-formed AuthChallenge");
  }
  Nonce theirs;
  std::memcpy(theirs.data(), challenge->nonce.data(), kNonceSize);
  AuthProof proof;
  if (secret != nullptr) {
    if (challenge->proof.empty()) {
      return PermissionDenied("coordinator " + address +
                              " runs without a cluster secret (--insecure); this process has one "
                              "and will not trust it");
    }
    if (!secret->Check(challenge->proof, kCoordinatorRole, mine, theirs)) {
      return PermissionDenied("coordinator " + address +
                              " does not know this cluster's secret (the secret files differ)");
    }
    proof.proof = secret->Prove(kCoordinatorClientRole, theirs, mine);
  }
  DSVM_ASSIGN_OR_RETURN(Message verdict, sock.Call(proof, timeout_ms));
  const auto* st = std::get_if<StatusReply>(&verdict);
  if (st == nullptr) {
    return PermissionDenied("coordinator " + address + " answered AuthProof with " +
                            TypeName(TypeOf(verdict)));
  }
  if (st->code != 0) return Status(FromReply(*st).code(), "coordinator " + address + ": " + st->message);
  return sock;
}

}  // namespace dsvm::proto
