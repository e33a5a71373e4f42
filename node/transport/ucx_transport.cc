#include "node/transport/ucx_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>

#include "proto/framed_socket.h"
#include "proto/log.h"

namespace dsvm::node {
namespace {

// The one active-message id dsvm uses: the frame inside says what it is.
constexpr unsigned kAmId = 1;

// Page bytes that arrive in an eager message of at least this size are
// kept in UCX's buffer when UCX allows it; smaller ones are copied out (a
// copy of a few pages costs less than UCX replacing a receive buffer).
constexpr size_t kHoldMinBytes = 16u << 10;

// A node id as the bytes a peer proof binds it with (little-endian).
std::array<uint8_t, 4> NodeBytes(proto::NodeId node) {
  return {static_cast<uint8_t>(node), static_cast<uint8_t>(node >> 8),
          static_cast<uint8_t>(node >> 16), static_cast<uint8_t>(node >> 24)};
}

Status FromUcs(const std::string& what, ucs_status_t st) {
  return Unavailable(what + ": " + ucs_status_string(st));
}

Status ParseIpv4(const std::string& address, sockaddr_in* sa) {
  std::string host;
  uint16_t port = 0;
  if (address.size() > 2 && address.compare(address.size() - 2, 2, ":0") == 0) {
    host = address.substr(0, address.size() - 2);
  } else {
    DSVM_RETURN_IF_ERROR(proto::ParseHostPort(address, &host, &port));
  }
  if (host == "localhost") host = "127.0.0.1";
  std::memset(sa, 0, sizeof(*sa));
  sa->sin_family = AF_INET;
  sa->sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &sa->sin_addr) != 1) {
    return InvalidArgument("'" + host + "' is not a numeric IPv4 address");
  }
  return Status::Ok();
}

}  // namespace

// A send in flight: owns the encoded frame and the page bytes until UCX
// reports completion.
struct UcxTransport::SendRequest {
  Handles* handles = nullptr;
  std::vector<uint8_t> header;
  Payload data;
};

// A rendezvous receive in flight: the PageData or PageBatch it will
// complete, and the buffer its bytes arrive in.
struct UcxTransport::RecvRequest {
  Handles* handles = nullptr;
  ucp_ep_h from = nullptr;
  proto::Message message;
  std::shared_ptr<uint8_t> data;
  size_t length = 0;
};

Result<std::unique_ptr<UcxTransport>> UcxTransport::Create(const UcxOptions& options) {
  if (options.max_inflight_sends == 0) return InvalidArgument("max_inflight_sends is 0");
  std::unique_ptr<UcxTransport> t(new UcxTransport(options));
  DSVM_RETURN_IF_ERROR(t->Start());
  return t;
}

Status UcxTransport::Start() {
  sockaddr_in sa{};
  DSVM_RETURN_IF_ERROR(ParseIpv4(options_.listen, &sa));

  ucp_config_t* config = nullptr;
  ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
  if (st != UCS_OK) return FromUcs("ucp_config_read", st);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  st = ucp_init(&params, config, &handles_->context);
  ucp_config_release(config);
  if (st != UCS_OK) return FromUcs("ucp_init", st);
  context_ = handles_->context;

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(context_, &wp, &handles_->worker);
  if (st != UCS_OK) return FromUcs("ucp_worker_create", st);
  worker_ = handles_->worker;
  handles_->transport = this;

  ucp_worker_attr_t attr{};
  attr.field_mask = UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER;
  st = ucp_worker_query(worker_, &attr);
  if (st != UCS_OK) return FromUcs("ucp_worker_query", st);
  max_am_header_ = attr.max_am_header;

  st = ucp_worker_get_efd(worker_, &efd_);
  if (st != UCS_OK) return FromUcs("ucp_worker_get_efd", st);

  ucp_am_handler_param_t hp{};
  hp.field_mask =
      UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
  hp.id = kAmId;
  hp.cb = &UcxTransport::OnActiveMessage;
  hp.arg = handles_.get();
  st = ucp_worker_set_am_recv_handler(worker_, &hp);
  if (st != UCS_OK) return FromUcs("ucp_worker_set_am_recv_handler", st);

  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  lp.sockaddr.addrlen = sizeof(sa);
  lp.conn_handler.cb = &UcxTransport::OnConnRequest;
  lp.conn_handler.arg = this;
  st = ucp_listener_create(worker_, &lp, &listener_);
  if (st != UCS_OK) return FromUcs("listen on " + options_.listen, st);
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  st = ucp_listener_query(listener_, &la);
  if (st != UCS_OK) return FromUcs("ucp_listener_query", st);
  port_ = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  return Status::Ok();
}

UcxTransport::~UcxTransport() {
  if (worker_ != nullptr) {
    Flush(1000).IgnoreError();
    // No new endpoints while the old ones close (OnConnRequest), and the
    // list is walked as a copy: the progress below may forget endpoints.
    if (listener_ != nullptr) ucp_listener_destroy(listener_);
    listener_ = nullptr;
    const std::vector<ucp_ep_h> eps = std::move(all_eps_);
    all_eps_.clear();
    for (ucp_ep_h ep : eps) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
      if (UCS_PTR_IS_PTR(r)) {
        for (int i = 0; i < 100000 && ucp_request_check_status(r) == UCS_INPROGRESS; ++i) {
          ucp_worker_progress(worker_);
        }
        ucp_request_free(r);
      }
    }
  }
  // The worker and the context go now, or once the last page still held in
  // one of the worker's buffers is dropped. Until then a callback the worker
  // still makes (a send that outlived the flush) finds no transport.
  handles_->transport = nullptr;
  handles_.reset();
}

UcxTransport::Handles::~Handles() {
  if (worker != nullptr) ucp_worker_destroy(worker);
  if (context != nullptr) ucp_cleanup(context);
}

// ---------------------------------------------------------------------------
// Endpoints

void UcxTransport::OnConnRequest(ucp_conn_request_h request, void* arg) {
  auto* self = static_cast<UcxTransport*>(arg);
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                  UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.conn_request = request;
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &UcxTransport::OnEndpointError;
  ep.err_handler.arg = self->handles_.get();
  ucp_ep_h h = nullptr;
  ucs_status_t st = ucp_ep_create(self->worker_, &ep, &h);
  if (st != UCS_OK) {
    LogWarning(std::string("refusing a peer connection: ") + ucs_status_string(st));
    return;
  }
  self->ep_node_[h] = proto::kNoNode;  // until its PeerHello
  self->all_eps_.push_back(h);
}

Status UcxTransport::Connect(proto::NodeId peer, const std::string& address) {
  if (options_.self == proto::kNoNode) return FailedPrecondition("Connect before set_self");
  if (peer == proto::kNoNode || peer == options_.self) {
    return InvalidArgument("cannot connect to node " + std::to_string(peer));
  }
  sockaddr_in sa{};
  DSVM_RETURN_IF_ERROR(ParseIpv4(address, &sa));
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                  UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  ep.sockaddr.addrlen = sizeof(sa);
  // PEER error handling reports a dead peer instead of hanging; on this UCX
  // it also gives up shared-memory lanes (notes/ucx.md, pitfall 4).
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = &UcxTransport::OnEndpointError;
  ep.err_handler.arg = handles_.get();
  ucp_ep_h h = nullptr;
  ucs_status_t st = ucp_ep_create(worker_, &ep, &h);
  if (st != UCS_OK) return FromUcs("connect to " + address, st);
  all_eps_.push_back(h);
  ep_node_[h] = peer;
  peers_[peer] = h;
  peer_generation_[peer] = next_generation_++;
  Handshake& hs = handshakes_[h];
  hs.connector = true;
  hs.node = peer;
  hs.mine = proto::RandomNonce();
  return SendOn(h, proto::PeerHello{options_.self, std::vector<uint8_t>(hs.mine.begin(), hs.mine.end())});
}

void UcxTransport::OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status) {
  UcxTransport* self = static_cast<Handles*>(arg)->transport;
  if (self == nullptr) return;
  auto it = self->ep_node_.find(ep);
  const proto::NodeId node = it == self->ep_node_.end() ? proto::kNoNode : it->second;
  LogWarning("UCX endpoint to node " + std::to_string(node) + " failed: " +
             ucs_status_string(status));
  self->failed_eps_.push_back(ep);
}

void UcxTransport::ForgetEndpoint(ucp_ep_h ep) {
  handshakes_.erase(ep);
  auto it = ep_node_.find(ep);
  if (it != ep_node_.end()) {
    auto p = peers_.find(it->second);
    if (p != peers_.end() && p->second == ep) peers_.erase(p);
    ep_node_.erase(it);
  }
  all_eps_.erase(std::remove(all_eps_.begin(), all_eps_.end(), ep), all_eps_.end());
}

// ---------------------------------------------------------------------------
// Sending

Status UcxTransport::Send(proto::NodeId peer, proto::Message message) {
  if (auto* pd = std::get_if<proto::PageData>(&message)) {
    return SendPage(peer, *pd, pd->data.size(), [pd](std::span<uint8_t> out) {
      std::memcpy(out.data(), pd->data.data(), out.size());
      return Status::Ok();
    });
  }
  auto it = peers_.find(peer);
  if (it == peers_.end()) return Unavailable("no endpoint to node " + std::to_string(peer));
  if (auto hs = handshakes_.find(it->second); hs != handshakes_.end()) {
    return HoldForHandshake(peer, hs->second, std::move(message));
  }
  return SendOn(it->second, std::move(message));
}

Status UcxTransport::HoldForHandshake(proto::NodeId peer, Handshake& hs, proto::Message message) {
  if (hs.held.size() >= options_.max_inflight_sends) {
    return ResourceExhausted("messages waiting for node " + std::to_string(peer) +
                             "'s handshake at their bound");
  }
  hs.held.push_back(std::move(message));
  return Status::Ok();
}

Status UcxTransport::SendPage(proto::NodeId peer, const proto::PageData& header, size_t length,
                              const PageFill& fill) {
  auto it = peers_.find(peer);
  if (it == peers_.end()) return Unavailable("no endpoint to node " + std::to_string(peer));
  if (length > proto::kMaxPageSize) {
    return InvalidArgument("a page of " + std::to_string(length) + " bytes is over the bound");
  }
  proto::PageData frame{header.page, header.txn, header.sender, header.version, {}, header.region};
  if (auto hs = handshakes_.find(it->second); hs != handshakes_.end()) {
    frame.data.resize(length);
    DSVM_RETURN_IF_ERROR(fill(frame.data));
    return HoldForHandshake(peer, hs->second, std::move(frame));
  }
  if (inflight_ >= options_.max_inflight_sends) {
    return ResourceExhausted("UCX sends in flight at their bound of " +
                             std::to_string(options_.max_inflight_sends));
  }
  if (length > options_.batch_page_bytes) {
    std::shared_ptr<uint8_t> buffer = buffers_->Take(length);
    DSVM_RETURN_IF_ERROR(fill(std::span<uint8_t>(buffer.get(), length)));
    return SendFrame(it->second, frame, Payload{std::move(buffer), length});
  }
  Batch& b = batches_[peer];
  if (!b.frame.pages.empty() &&
      (b.frame.pages.size() == proto::kMaxBatchPages || b.size + length > b.capacity)) {
    SendBatch(peer, b);
  }
  if (b.buffer == nullptr) {
    // Room for the fullest batch of such pages at once.
    b.capacity = std::max<size_t>(
        length, std::min<size_t>(proto::kMaxBatchBytes, proto::kMaxBatchPages * length));
    b.buffer = buffers_->Take(b.capacity);
  }
  if (Status st = fill(std::span<uint8_t>(b.buffer.get() + b.size, length)); !st.ok()) {
    if (b.frame.pages.empty()) b.Clear();
    return st;
  }
  b.size += length;
  b.frame.sender = options_.self;
  b.frame.pages.push_back(
      proto::BatchedPage{header.page, header.txn, header.version, static_cast<uint32_t>(length),
                         header.region});
  return Status::Ok();
}

Status UcxTransport::SendPageFrom(proto::NodeId peer, const proto::PageData& header,
                                  std::shared_ptr<const uint8_t> bytes, size_t length) {
  auto it = peers_.find(peer);
  if (bytes != nullptr && length > options_.batch_page_bytes && length <= proto::kMaxPageSize &&
      it != peers_.end() && handshakes_.count(it->second) == 0) {
    DSVM_RETURN_IF_ERROR(SendFrame(it->second,
                                   proto::PageData{header.page, header.txn, header.sender,
                                                   header.version, {}, header.region},
                                   Payload{std::move(bytes), length}));
    ++stats_.sent_from_lent;
    return Status::Ok();
  }
  return SendPage(peer, header, length, [&bytes](std::span<uint8_t> out) {
    if (bytes == nullptr) return InvalidArgument("SendPageFrom without bytes");
    std::memcpy(out.data(), bytes.get(), out.size());
    return Status::Ok();
  });
}

void UcxTransport::FlushBatches() {
  for (auto& [peer, batch] : batches_) {
    if (!batch.frame.pages.empty()) SendBatch(peer, batch);
  }
}

size_t UcxTransport::held_batch_pages() const {
  size_t n = 0;
  for (const auto& [peer, batch] : batches_) n += batch.frame.pages.size();
  return n;
}

void UcxTransport::SendBatch(proto::NodeId peer, Batch& batch) {
  const size_t pages = batch.frame.pages.size();
  auto it = peers_.find(peer);
  if (it != peers_.end()) {
    if (auto hs = handshakes_.find(it->second); hs != handshakes_.end()) {
      // The endpoint was replaced since the pages were queued and the new
      // one is not trusted yet: they wait with its other messages.
      size_t at = 0;
      for (const proto::BatchedPage& p : batch.frame.pages) {
        if (hs->second.held.size() < options_.max_inflight_sends) {
          hs->second.held.push_back(proto::PageData{
              p.page, p.txn, batch.frame.sender, p.version,
              std::vector<uint8_t>(batch.buffer.get() + at, batch.buffer.get() + at + p.length),
              p.region});
        }
        at += p.length;
      }
      batch.Clear();
      return;
    }
  }
  Status st = it == peers_.end() ? Unavailable("no endpoint to node " + std::to_string(peer))
              : pages == 1
                  ? SendFrame(it->second,
                              proto::PageData{batch.frame.pages[0].page, batch.frame.pages[0].txn,
                                              batch.frame.sender, batch.frame.pages[0].version, {},
                                              batch.frame.pages[0].region},
                              Payload{batch.buffer, batch.size})
                  : SendFrame(it->second, batch.frame, Payload{batch.buffer, batch.size});
  if (st.ok() && pages > 1) {
    ++stats_.batches_sent;
    stats_.batched_pages += pages;
  } else if (!st.ok()) {
    // Its pages count as sent (Send said so): a new generation lets the
    // owner send them again when the directory asks again.
    if (it != peers_.end()) peer_generation_[peer] = next_generation_++;
    LogWarning("a batch of " + std::to_string(pages) + " pages for node " + std::to_string(peer) +
               " was dropped: " + st.ToString());
  }
  batch.Clear();
}

Status UcxTransport::SendOn(ucp_ep_h ep, proto::Message message) {
  Payload data;
  if (auto* pd = std::get_if<proto::PageData>(&message); pd != nullptr && !pd->data.empty()) {
    // The bytes go as the AM data, in their own vector; the frame goes without them.
    auto owned = std::make_shared<std::vector<uint8_t>>(std::move(pd->data));
    pd->data.clear();
    data = Payload{std::shared_ptr<const uint8_t>(owned, owned->data()), owned->size()};
  }
  return SendFrame(ep, message, std::move(data));
}

Status UcxTransport::SendFrame(ucp_ep_h ep, const proto::Message& message, Payload data) {
  if (inflight_ >= options_.max_inflight_sends) {
    return ResourceExhausted("UCX sends in flight at their bound of " +
                             std::to_string(options_.max_inflight_sends));
  }
  auto req = std::make_unique<SendRequest>();
  req->handles = handles_.get();
  req->data = std::move(data);
  proto::EncodeTo(message, 0, &req->header);
  DSVM_CHECK_MSG(req->header.size() <= max_am_header_, "frame larger than UCX's AM header limit");

  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_AM_SEND_FLAG_REPLY;  // the receiver learns which endpoint sent it
  // A batch goes eagerly: rendezvous would cost a round trip (and the wake-up
  // of both daemons) before the bytes move; a batch is at most
  // kMaxBatchBytes, and the receiver keeps a large one in UCX's buffer.
  if (std::holds_alternative<proto::PageBatch>(message)) p.flags |= UCP_AM_SEND_FLAG_EAGER;
  p.cb.send = &UcxTransport::OnSendDone;
  p.user_data = req.get();
  ucs_status_ptr_t s = ucp_am_send_nbx(ep, kAmId, req->header.data(), req->header.size(),
                                       req->data.bytes.get(), req->data.size, &p);
  if (s == nullptr) {
    ++stats_.sent;
    return Status::Ok();  // completed at once; the buffers may go
  }
  if (UCS_PTR_IS_ERR(s)) {
    ++stats_.send_errors;
    return FromUcs("ucp_am_send_nbx", UCS_PTR_STATUS(s));
  }
  req.release();  // owned by UCX until OnSendDone
  ++inflight_;
  return Status::Ok();
}

void UcxTransport::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  std::unique_ptr<SendRequest> req(static_cast<SendRequest*>(user_data));
  if (UcxTransport* self = req->handles->transport; self != nullptr) {
    --self->inflight_;
    ++(status == UCS_OK ? self->stats_.sent : self->stats_.send_errors);
  }
  ucp_request_free(request);
}

// ---------------------------------------------------------------------------
// Receiving

ucs_status_t UcxTransport::OnActiveMessage(void* arg, const void* header, size_t header_length,
                                           void* data, size_t length,
                                           const ucp_am_recv_param_t* param) {
  UcxTransport* self = static_cast<Handles*>(arg)->transport;
  if (self == nullptr) return UCS_OK;  // the worker outlives the transport
  ucp_ep_h from = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : nullptr;
  auto frame = proto::Decode(
      std::span<const uint8_t>(static_cast<const uint8_t*>(header), header_length));
  if (!frame.ok() || from == nullptr) {
    ++self->stats_.malformed;
    return UCS_OK;  // a rendezvous descriptor not received is dropped by UCX
  }
  auto* pd = std::get_if<proto::PageData>(&frame->message);
  auto* batch = std::get_if<proto::PageBatch>(&frame->message);
  if (pd == nullptr && batch == nullptr) {
    if (length != 0) {
      ++self->stats_.malformed;  // only PageData and PageBatch carry data
      return UCS_OK;
    }
    self->Deliver(from, std::move(frame->message));
    return UCS_OK;
  }
  // Page bytes only from a peer that proved the cluster secret: nothing is
  // fetched or copied for anyone else (Deliver would drop it anyway).
  if (!self->Authenticated(from)) {
    ++self->stats_.dropped_before_hello;
    return UCS_OK;  // a rendezvous descriptor not received is dropped by UCX
  }
  // The bytes must be what the frame says: one page, or the batch's pages.
  if (pd != nullptr ? length > proto::kMaxPageSize || !pd->data.empty()
                    : length != batch->TotalBytes()) {
    ++self->stats_.malformed;
    return UCS_OK;
  }
  auto* bytes = static_cast<uint8_t*>(data);
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    if (length >= kHoldMinBytes && (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_DATA)) {
      // UCX lets us keep its buffer: the pages are handed on in it, and it
      // goes back to UCX when the last of them is dropped (UCS_INPROGRESS
      // tells UCX it is kept). Should no page have been kept, it is UCX's
      // again at once: the release is disarmed and UCS_OK returned.
      std::shared_ptr<const uint8_t> held(bytes, AmDataRelease{self->handles_});
      self->DeliverPages(from, std::move(frame->message), held, length);
      if (held.use_count() == 1) {
        std::get_deleter<AmDataRelease>(held)->armed = false;
        return UCS_OK;
      }
      ++self->stats_.held_receives;
      return UCS_INPROGRESS;
    }
    std::shared_ptr<uint8_t[]> copy(new uint8_t[length]);
    if (length != 0) std::memcpy(copy.get(), bytes, length);
    self->DeliverPages(from, std::move(frame->message), {copy, copy.get()}, length);
    return UCS_OK;
  }
  // Rendezvous: the bytes are fetched into our buffer, then delivered.
  auto rr = std::make_unique<RecvRequest>();
  rr->handles = self->handles_.get();
  rr->from = from;
  rr->message = std::move(frame->message);
  // Where the placer says (in place), or else from the pool: its pages are
  // in already, not faulted in inside the socket receive, where faults held
  // it up (2 MiB read faults over tcp: 1.00-1.01 GB/s into unzeroed fresh
  // buffers against 1.09-1.17 zeroed, three alternated runs each).
  if (pd != nullptr && self->placer_) {
    rr->data = self->placer_(self->ep_node_.at(from), *pd, length);
    if (rr->data != nullptr) ++self->stats_.received_placed;
  }
  if (rr->data == nullptr) rr->data = self->buffers_->Take(length);
  rr->length = length;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv_am = &UcxTransport::OnRecvDone;
  p.user_data = rr.get();
  ucs_status_ptr_t s = ucp_am_recv_data_nbx(self->worker_, data, rr->data.get(), length, &p);
  if (s == nullptr) {
    OnRecvDone(nullptr, UCS_OK, length, rr.release());
  } else if (UCS_PTR_IS_ERR(s)) {
    ++self->stats_.malformed;
  } else {
    rr.release();  // completes in OnRecvDone
  }
  return UCS_OK;
}

void UcxTransport::OnRecvDone(void* request, ucs_status_t status, size_t length, void* user_data) {
  std::unique_ptr<RecvRequest> rr(static_cast<RecvRequest*>(user_data));
  UcxTransport* self = rr->handles->transport;
  if (self == nullptr) {
    // the transport is gone: nothing to deliver to
  } else if (status == UCS_OK && length == rr->length) {
    ++self->stats_.rendezvous_received;
    self->DeliverPages(rr->from, std::move(rr->message), {rr->data, rr->data.get()}, length);
  } else {
    ++self->stats_.malformed;
  }
  if (request != nullptr) ucp_request_free(request);
}

void UcxTransport::DeliverPages(ucp_ep_h from, proto::Message message,
                                std::shared_ptr<const uint8_t> buffer, size_t length) {
  auto* batch = std::get_if<proto::PageBatch>(&message);
  if (batch == nullptr) return Deliver(from, std::move(message), ReceivedPage{buffer, length});
  ++stats_.batches_received;
  size_t at = 0;
  for (const proto::BatchedPage& p : batch->pages) {
    // Each page shares the buffer and points at its own bytes in it.
    Deliver(from, proto::PageData{p.page, p.txn, batch->sender, p.version, {}, p.region},
            ReceivedPage{std::shared_ptr<const uint8_t>(buffer, buffer.get() + at), p.length});
    at += p.length;
  }
}

void UcxTransport::RefuseEndpoint(ucp_ep_h ep, const std::string& why) {
  ++stats_.refused_peers;
  LogWarning("refusing a peer endpoint: " + why);
  ForgetEndpoint(ep);
  failed_eps_.push_back(ep);  // closed at the end of this Progress
}

// Listener side: a connector names itself and sends its nonce.
void UcxTransport::OnPeerHello(ucp_ep_h from, const proto::PeerHello& m) {
  auto it = ep_node_.find(from);
  if (it == ep_node_.end() || it->second != proto::kNoNode || handshakes_.count(from) != 0 ||
      m.node == proto::kNoNode || m.node == options_.self || m.nonce.size() != proto::kNonceSize) {
    ++stats_.malformed;
    return;
  }
  Handshake& hs = handshakes_[from];
  hs.node = m.node;
  std::memcpy(hs.theirs.data(), m.nonce.data(), proto::kNonceSize);
  hs.have_theirs = true;
  hs.mine = proto::RandomNonce();
  proto::PeerChallenge c;
  c.nonce.assign(hs.mine.begin(), hs.mine.end());
  if (options_.secret) c.proof = options_.secret->Prove(proto::kPeerListenerRole, hs.theirs, hs.mine, NodeBytes(m.node));
  Status st = SendOn(from, std::move(c));
  if (!st.ok()) LogWarning("answering node " + std::to_string(m.node) + "'s hello: " + st.ToString());
}

// Connector side: the listener's proof; ours in return, then what waited.
void UcxTransport::OnPeerChallenge(ucp_ep_h from, const proto::PeerChallenge& m) {
  auto it = handshakes_.find(from);
  if (it == handshakes_.end() || !it->second.connector || m.nonce.size() != proto::kNonceSize) {
    ++stats_.malformed;
    return;
  }
  Handshake& hs = it->second;
  const std::string who = "node " + std::to_string(hs.node);
  std::memcpy(hs.theirs.data(), m.nonce.data(), proto::kNonceSize);
  proto::PeerProof proof;
  if (options_.secret) {
    if (m.proof.empty()) {
      return RefuseEndpoint(from, who + " has no cluster secret; this node has one");
    }
    if (!options_.secret->Check(m.proof, proto::kPeerListenerRole, hs.mine, hs.theirs,
                                NodeBytes(options_.self))) {
      return RefuseEndpoint(from, who + " does not know this cluster's secret");
    }
    proof.proof = options_.secret->Prove(proto::kPeerConnectorRole, hs.theirs, hs.mine,
                                         NodeBytes(options_.self));
  }
  std::vector<proto::Message> held = std::move(hs.held);
  handshakes_.erase(it);
  Status st = SendOn(from, std::move(proof));
  for (auto& msg : held) {
    if (st.ok()) st = SendOn(from, std::move(msg));
  }
  if (!st.ok()) LogWarning("sending to " + who + " after its handshake: " + st.ToString());
}

// Listener side: the connector's proof; from now on its messages count.
void UcxTransport::OnPeerProof(ucp_ep_h from, const proto::PeerProof& m) {
  auto it = handshakes_.find(from);
  if (it == handshakes_.end() || it->second.connector || !it->second.have_theirs) {
    ++stats_.malformed;
    return;
  }
  const Handshake hs = std::move(it->second);
  handshakes_.erase(it);
  const std::string who = "node " + std::to_string(hs.node);
  if (options_.secret &&
      !options_.secret->Check(m.proof, proto::kPeerConnectorRole, hs.mine, hs.theirs,
                              NodeBytes(hs.node))) {
    return RefuseEndpoint(from, who + (m.proof.empty() ? " has no cluster secret"
                                                       : " does not know this cluster's secret"));
  }
  ep_node_[from] = hs.node;
  // Our own endpoint to it, if any, stays preferred.
  if (peers_.try_emplace(hs.node, from).second) peer_generation_[hs.node] = next_generation_++;
}

bool UcxTransport::Authenticated(ucp_ep_h ep) const {
  auto it = ep_node_.find(ep);
  return it != ep_node_.end() && it->second != proto::kNoNode && handshakes_.count(ep) == 0;
}

void UcxTransport::Deliver(ucp_ep_h from, proto::Message m, ReceivedPage page) {
  if (auto* hello = std::get_if<proto::PeerHello>(&m)) return OnPeerHello(from, *hello);
  if (auto* c = std::get_if<proto::PeerChallenge>(&m)) return OnPeerChallenge(from, *c);
  if (auto* p = std::get_if<proto::PeerProof>(&m)) return OnPeerProof(from, *p);
  if (!Authenticated(from)) {
    ++stats_.dropped_before_hello;
    return;
  }
  ++stats_.received;
  std::vector<UcxIncoming>* out = sink_ != nullptr ? sink_ : &late_;
  out->push_back(UcxIncoming{ep_node_.at(from), std::move(m), std::move(page)});
}

size_t UcxTransport::Progress(std::vector<UcxIncoming>* in) {
  const size_t before = in->size();
  for (auto& m : late_) in->push_back(std::move(m));
  late_.clear();
  sink_ = in;
  while (ucp_worker_progress(worker_) != 0) {
  }
  sink_ = nullptr;
  for (ucp_ep_h ep : failed_eps_) {
    ForgetEndpoint(ep);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(r)) ucp_request_free(r);  // released when the close completes
  }
  failed_eps_.clear();
  return in->size() - before;
}

bool UcxTransport::Arm() { return ucp_worker_arm(worker_) == UCS_OK; }

Status UcxTransport::Flush(int timeout_ms) {
  FlushBatches();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  std::vector<UcxIncoming> held;
  while (inflight_ > 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      for (auto& m : held) late_.push_back(std::move(m));
      return Unavailable(std::to_string(inflight_) + " UCX sends still in flight");
    }
    Progress(&held);
  }
  for (auto& m : held) late_.push_back(std::move(m));
  return Status::Ok();
}

}  // namespace dsvm::node
