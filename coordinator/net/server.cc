#include "coordinator/net/server.h"

#include <array>
#include <cstring>
#include <unordered_set>

#include "proto/framed_socket.h"
#include "proto/log.h"

namespace dsvm::coordinator {

namespace asio = boost::asio;
using asio::ip::tcp;

namespace {

// Before a connection has proved the cluster secret it may send only the
// two handshake messages, each this small at most (a nonce or a proof), and
// must finish within kHandshakeMs: an unauthenticated peer gets neither
// buffer space nor a connection slot for long.
constexpr uint32_t kMaxHandshakePayload = 256;
// Messages of one connection handled per turn of the loop (a PageRun counts
// its messages): a 64 KiB read of runs stands for up to about 900 000, and
// their replies wait for the turn's flush.
constexpr size_t kMessagesPerTurn = 4096;
constexpr uint64_t kHandshakeMs = 10'000;
// After a failed accept (out of descriptors, say) the next one waits this long.
constexpr int kAcceptBackoffMs = 100;

}  // namespace

struct Server::Connection {
  Connection(tcp::socket s, ConnId id) : socket(std::move(s)), id(id) {}
  tcp::socket socket;
  ConnId id;
  std::string peer;
  std::array<uint8_t, 64 << 10> buf{};
  std::vector<uint8_t> in;
  std::vector<uint8_t> out_pending;  // encoded, waiting for the write in progress
  std::vector<uint8_t> out_writing;  // owned by the async_write in progress
  proto::RunPacker packer;           // within one SendAll: runs of coherence messages
  bool writing = false;
  bool closing = false;  // refused: write what is queued (the error reply), then close
  bool closed = false;
  enum class Auth { kAwaitHello, kAwaitProof, kDone } auth = Auth::kAwaitHello;
  uint64_t accepted_ms = 0;  // a handshake not done kHandshakeMs later is closed
  proto::Nonce their_nonce{};
  proto::Nonce my_nonce{};
};

Server::Server(asio::io_context& io, CoordinatorService& service, ServerOptions options)
    : io_(io),
      service_(service),
      options_(std::move(options)),
      acceptor_(io),
      tick_timer_(io),
      retry_timer_(io),
      accept_timer_(io) {}

Server::~Server() { Stop(); }

uint64_t MonotonicMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

Result<uint16_t> Server::Start() {
  std::string host;
  uint16_t port = 0;
  if (options_.listen.size() > 2 && options_.listen.substr(options_.listen.size() - 2) == ":0") {
    host = options_.listen.substr(0, options_.listen.size() - 2);
  } else {
    DSVM_RETURN_IF_ERROR(proto::ParseHostPort(options_.listen, &host, &port));
  }
  if (host == "localhost") host = "127.0.0.1";
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec) return InvalidArgument("listen address '" + host + "': " + ec.message());
  tcp::endpoint ep(addr, port);
  acceptor_.open(ep.protocol(), ec);
  if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor_.bind(ep, ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Unavailable("listen on " + options_.listen + ": " + ec.message());
  Accept();
  ScheduleTick();
  return acceptor_.local_endpoint().port();
}

void Server::Stop() {
  if (stopped_) return;
  stopped_ = true;
  boost::system::error_code ec;
  acceptor_.close(ec);
  tick_timer_.cancel();
  retry_timer_.cancel();
  accept_timer_.cancel();
  auto conns = conns_;
  for (auto& [id, c] : conns) Close(c, "coordinator stopping");
}

void Server::Accept() {
  acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    if (stopped_) return;
    if (!ec) {
      boost::system::error_code opt_ec;
      socket.set_option(tcp::no_delay(true), opt_ec);
      auto c = std::make_shared<Connection>(std::move(socket), next_conn_++);
      c->accepted_ms = MonotonicMs();
      auto remote = c->socket.remote_endpoint(opt_ec);
      c->peer = opt_ec ? "?" : remote.address().to_string() + ":" + std::to_string(remote.port());
      conns_[c->id] = c;
      Read(c);
    } else {
      // Accepting again at once would spin while the error lasts (EMFILE).
      LogWarning("accept: " + ec.message() + "; retrying in " + std::to_string(kAcceptBackoffMs) +
                 " ms");
      accept_timer_.expires_after(std::chrono::milliseconds(kAcceptBackoffMs));
      accept_timer_.async_wait([this](boost::system::error_code tec) {
        if (!tec && !stopped_) Accept();
      });
      return;
    }
    Accept();
  });
}

void Server::Read(std::shared_ptr<Connection> c) {
  c->socket.async_read_some(asio::buffer(c->buf), [this, c](boost::system::error_code ec, size_t n) {
    if (c->closed) return;
    if (ec) {
      Close(c, ec == asio::error::eof ? "" : ec.message());
      return;
    }
    c->in.insert(c->in.end(), c->buf.begin(), c->buf.begin() + n);
    ConsumeThenRead(c);
  });
}

void Server::ConsumeThenRead(const std::shared_ptr<Connection>& c) {
  const bool drained = Consume(c);
  if (c->closed || c->closing) return;
  if (drained) return Read(c);
  // The rest of what was read in a later turn, after this turn's flush:
  // each turn's replies are bounded, and other connections get their turn.
  asio::post(io_, [this, c] {
    if (!c->closed) ConsumeThenRead(c);
  });
}

bool Server::Consume(const std::shared_ptr<Connection>& c) {
  size_t pos = 0;
  const uint64_t now = MonotonicMs();
  size_t dispatched = 0;
  bool drained = true;
  while (c->in.size() - pos >= proto::kHeaderSize) {
    if (dispatched >= kMessagesPerTurn) {
      drained = false;
      break;
    }
    auto header = proto::DecodeHeader(std::span<const uint8_t>(c->in.data() + pos, proto::kHeaderSize));
    if (!header.ok()) {
      Close(c, "malformed frame header: " + header.status().ToString());
      return true;
    }
    if (c->auth != Connection::Auth::kDone &&
        ((header->type != proto::MessageType::kAuthHello &&
          header->type != proto::MessageType::kAuthProof) ||
         header->payload_length > kMaxHandshakePayload)) {
      // Refused before its payload is buffered.
      Refuse(c, header->request_id,
             PermissionDenied("a " + std::to_string(header->payload_length) + "-byte " +
                              proto::TypeName(header->type) +
                              " before the handshake: only AuthHello and AuthProof, of at most " +
                              std::to_string(kMaxHandshakePayload) + " bytes"));
      break;
    }
    if (c->in.size() - pos - proto::kHeaderSize < header->payload_length) break;
    auto message = proto::DecodePayload(
        *header, std::span<const uint8_t>(c->in.data() + pos + proto::kHeaderSize,
                                          header->payload_length));
    pos += proto::kHeaderSize + header->payload_length;
    if (!message.ok()) {
      Close(c, "malformed frame: " + message.status().ToString());
      return true;
    }
    proto::Frame frame{*header, std::move(*message)};
    if (c->auth != Connection::Auth::kDone) {
      if (!Authenticate(c, frame)) break;
      continue;
    }
    dispatched += std::holds_alternative<proto::PageRun>(frame.message)
                      ? std::get<proto::PageRun>(frame.message).count
                      : 1;
    Status st = Dispatch(c, frame, now);
    if (!st.ok()) {
      LogWarning("closing connection " + c->peer + ": " + st.ToString());
      c->closing = true;  // the service queued an error reply; send it, then close
      break;
    }
  }
  c->in.erase(c->in.begin(), c->in.begin() + static_cast<std::ptrdiff_t>(pos));
  ScheduleFlush();
  return drained;
}

Status Server::Dispatch(const std::shared_ptr<Connection>& c, const proto::Frame& frame,
                        uint64_t now) {
  const auto* run = std::get_if<proto::PageRun>(&frame.message);
  if (run == nullptr) return service_.OnFrame(c->id, frame, now);
  if (frame.header.request_id != 0) {
    return InvalidArgument("a PageRun with request id " + std::to_string(frame.header.request_id) +
                           " (runs answer no request)");
  }
  // A run is its messages, one by one, as if each had come alone.
  proto::Frame one{frame.header, {}};
  for (uint32_t i = 0; i < run->count; ++i) {
    one.message = proto::PageRunAt(*run, i);
    one.header.type = proto::TypeOf(one.message);
    DSVM_RETURN_IF_ERROR(service_.OnFrame(c->id, one, now));
  }
  return Status::Ok();
}

bool Server::Authenticate(const std::shared_ptr<Connection>& c, const proto::Frame& frame) {
  const uint64_t rid = frame.header.request_id;
  if (c->auth == Connection::Auth::kAwaitHello) {
    const auto* hello = std::get_if<proto::AuthHello>(&frame.message);
    if (hello == nullptr || hello->nonce.size() != proto::kNonceSize) {
      Refuse(c, rid,
             PermissionDenied(std::string("the first message must be AuthHello with a ") +
                              std::to_string(proto::kNonceSize) + "-byte nonce, not " +
                              proto::TypeName(proto::TypeOf(frame.message))));
      return false;
    }
    std::memcpy(c->their_nonce.data(), hello->nonce.data(), proto::kNonceSize);
    c->my_nonce = proto::RandomNonce();
    proto::AuthChallenge challenge;
    challenge.nonce.assign(c->my_nonce.begin(), c->my_nonce.end());
    if (options_.secret != nullptr) {
      challenge.proof = options_.secret->Prove(proto::kCoordinatorRole, c->their_nonce, c->my_nonce);
    }
    proto::EncodeTo(challenge, rid, &c->out_pending);
    Write(c);
    c->auth = Connection::Auth::kAwaitProof;
    return true;
  }
  const auto* proof = std::get_if<proto::AuthProof>(&frame.message);
  if (proof == nullptr) {
    Refuse(c, rid, PermissionDenied(std::string("expected AuthProof, not ") +
                                    proto::TypeName(proto::TypeOf(frame.message))));
    return false;
  }
  if (options_.secret != nullptr &&
      !options_.secret->Check(proof->proof, proto::kCoordinatorClientRole, c->my_nonce,
                              c->their_nonce)) {
    Refuse(c, rid, PermissionDenied(proof->proof.empty()
                                        ? "this coordinator requires the cluster secret; give "
                                          "--secret-file or set DSVM_SECRET_FILE"
                                        : "wrong cluster secret"));
    return false;
  }
  c->auth = Connection::Auth::kDone;
  proto::EncodeTo(proto::ToReply(Status::Ok()), rid, &c->out_pending);
  Write(c);
  return true;
}

void Server::Refuse(const std::shared_ptr<Connection>& c, uint64_t request_id, const Status& why) {
  LogWarning("refusing connection " + c->peer + ": " + why.message());
  proto::EncodeTo(proto::ToReply(why), request_id, &c->out_pending);
  c->closing = true;
  Write(c);
}

void Server::Close(const std::shared_ptr<Connection>& c, const std::string& why) {
  if (c->closed) return;
  c->closed = true;
  if (!why.empty()) LogWarning("connection " + c->peer + " closed: " + why);
  boost::system::error_code ec;
  c->socket.shutdown(tcp::socket::shutdown_both, ec);
  c->socket.close(ec);
  service_.OnDisconnect(c->id);
  conns_.erase(c->id);
}

void Server::ScheduleFlush() {
  if (flush_scheduled_ || stopped_) return;
  flush_scheduled_ = true;
  // Posted, so every frame already read in this turn of the loop shares one
  // durable write (group commit).
  asio::post(io_, [this] { DoFlush(); });
}

void Server::SendAll(std::vector<Send>& sends) {
  std::unordered_set<ConnId> touched;
  for (Send& s : sends) {
    auto it = conns_.find(s.conn);
    if (it == conns_.end()) continue;
    Connection& c = *it->second;
    c.packer.Add(s.message, s.request_id, &c.out_pending);
    touched.insert(s.conn);
  }
  for (ConnId id : touched) {
    auto it = conns_.find(id);
    if (it == conns_.end()) continue;
    it->second->packer.Finish(&it->second->out_pending);
    Write(it->second);
  }
}

void Server::DoFlush() {
  flush_scheduled_ = false;
  if (stopped_) return;
  std::vector<Send> sends;
  Status st = service_.Flush(&sends);
  if (!st.ok()) {
    if (!flush_failing_) {  // once per outage: it is retried every 200 ms
      LogError("writing to the store failed; replies held until it succeeds (retried every "
               "200 ms): " + st.ToString());
    }
    flush_failing_ = true;
    retry_timer_.expires_after(std::chrono::milliseconds(200));
    retry_timer_.async_wait([this](boost::system::error_code ec) {
      if (!ec) ScheduleFlush();
    });
    // What may leave does (heartbeat answers); a refused connection stays
    // open until its held answer has left.
    SendAll(sends);
    return;
  }
  if (flush_failing_) {
    flush_failing_ = false;
    LogInfo("the store is written again; held replies leave");
  }
  SendAll(sends);
  // A refused connection with nothing left to send closes now.
  std::vector<std::shared_ptr<Connection>> done;
  for (auto& [id, c] : conns_) {
    if (c->closing && !c->writing && c->out_pending.empty()) done.push_back(c);
  }
  for (auto& c : done) Close(c, "");
}

void Server::Write(const std::shared_ptr<Connection>& c) {
  if (c->closed) return;
  // Checked before the write in progress: a peer that reads nothing never
  // lets that write end, and what queues behind it must stay bounded.
  if (c->out_pending.size() > options_.max_output_bytes) {
    Close(c, "peer is not reading its replies");
    return;
  }
  if (c->writing) return;
  if (c->out_pending.empty()) {
    if (c->closing) Close(c, "");
    return;
  }
  std::swap(c->out_writing, c->out_pending);
  c->out_pending.clear();
  c->writing = true;
  asio::async_write(c->socket, asio::buffer(c->out_writing),
                    [this, c](boost::system::error_code ec, size_t) {
                      c->writing = false;
                      c->out_writing.clear();
                      if (c->closed) return;
                      if (ec) {
                        Close(c, ec.message());
                        return;
                      }
                      Write(c);
                    });
}

void Server::ScheduleTick() {
  tick_timer_.expires_after(std::chrono::milliseconds(options_.tick_ms));
  tick_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || stopped_) return;
    const uint64_t now = MonotonicMs();
    std::vector<std::shared_ptr<Connection>> slow;
    for (const auto& [id, c] : conns_) {
      if (c->auth != Connection::Auth::kDone && !c->closing && now - c->accepted_ms > kHandshakeMs) {
        slow.push_back(c);
      }
    }
    for (const auto& c : slow) Close(c, "no handshake within " + std::to_string(kHandshakeMs) + " ms");
    service_.OnTick(now);
    ScheduleFlush();
    ScheduleTick();
  });
}

}  // namespace dsvm::coordinator
