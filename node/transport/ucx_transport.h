// UcxTransport: node-to-node messages over UCX active messages.
//
// Every byte of page data between nodes crosses here. One UCX worker, owned
// by one thread (the node daemon's event loop): nothing here locks. The loop
// sleeps on event_fd() after Arm() and calls Progress() when it is readable,
// or busy-polls Progress() on the fault path (../shared/notes/ucx.md, pitfall
// 1: a peer that does not progress stalls everyone who talks to it).
//
// Wire rule (proto/PROTOCOL.md): one proto frame per active message, in the
// AM header; PageData's bytes travel as the AM data, never inside the frame.
// Peers authenticate each other on every new endpoint (proto/auth.h): the
// connector says PeerHello with a nonce, the listener answers PeerChallenge
// (its nonce and proof), the connector checks it and sends PeerProof. Only
// then does the listener accept the endpoint's messages as the node's, and
// only then does the connector send what it queued for the peer. Messages
// from an endpoint not yet trusted are dropped; a failed proof closes it.
#ifndef DSVM_NODE_TRANSPORT_UCX_TRANSPORT_H_
#define DSVM_NODE_TRANSPORT_UCX_TRANSPORT_H_

#include <ucp/api/ucp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "node/transport/buffer_pool.h"
#include "proto/auth.h"
#include "proto/messages.h"

namespace dsvm::node {

struct UcxOptions {
  // This node; may be set later with set_self() (a node learns its id by
  // joining, and joins with its UCX address), but before Connect.
  proto::NodeId self = proto::kNoNode;
  std::string listen = "127.0.0.1:0";  // IPv4 "host:port"; port 0 picks a free one
  // Upper bound on sends not yet completed by UCX; Send refuses beyond it.
  size_t max_inflight_sends = 4096;
  // The cluster secret peers prove to each other; null: none (an insecure
  // cluster: the proofs are empty, and a peer that has a secret refuses).
  std::shared_ptr<const proto::ClusterSecret> secret;
  // Pages of at most this many bytes sent to one peer are held and go
  // together as one PageBatch (PROTOCOL.md) at FlushBatches(), or when the
  // batch is full. 0: every page goes alone.
  size_t batch_page_bytes = 64u << 10;
  // The buffers page bytes leave from (a page sent alone, a batch) or
  // arrive in by rendezvous are kept for reuse, up to this many bytes
  // (BufferPool; kept for the daemon's life). Enough for a prefetch's window
  // of 2 MiB pages (16 MiB) in each direction.
  size_t kept_buffer_bytes = 32u << 20;
};

// The bytes of one received page, where they arrived: in UCX's own receive
// buffer, held until the last page of it is dropped (a large eager message),
// or in a buffer of ours (a small eager message, copied out once, or a
// rendezvous, received into it). Copies share the buffer; nothing copies the
// bytes. A page may outlive its transport (UCX's worker stays until the last
// such page goes). Drop them on the thread that calls Progress().
struct ReceivedPage {
  std::shared_ptr<const uint8_t> data;  // the page's first byte; owns the buffer
  size_t size = 0;
  std::span<const uint8_t> bytes() const { return {data.get(), size}; }
};

struct UcxIncoming {
  proto::NodeId from = proto::kNoNode;
  // A PageData arrives without its bytes (its `data` is empty): they are
  // in `page`.
  proto::Message message;
  ReceivedPage page;
};

struct UcxStats {
  uint64_t sent = 0;
  uint64_t received = 0;
  uint64_t rendezvous_received = 0;
  uint64_t dropped_before_hello = 0;
  uint64_t refused_peers = 0;  // endpoints closed for a missing or wrong proof
  uint64_t malformed = 0;
  uint64_t send_errors = 0;
  uint64_t batches_sent = 0;      // PageBatch active messages
  uint64_t batched_pages = 0;     // pages that went in them
  uint64_t batches_received = 0;
  // Eager messages with page bytes whose buffer UCX let us keep: their
  // pages were delivered without a copy.
  uint64_t held_receives = 0;
  uint64_t sent_from_lent = 0;      // pages sent from the caller's bytes (SendPageFrom)
  uint64_t received_placed = 0;     // rendezvous pages received where the placer said
};

class UcxTransport {
 public:
  // Errors: kInvalidArgument (options), kUnavailable (UCX could not start or
  // listen; the message carries UCX's reason).
  static Result<std::unique_ptr<UcxTransport>> Create(const UcxOptions& options);
  ~UcxTransport();
  UcxTransport(const UcxTransport&) = delete;
  UcxTransport& operator=(const UcxTransport&) = delete;

  proto::NodeId self() const { return options_.self; }
  void set_self(proto::NodeId self) { options_.self = self; }
  uint16_t port() const { return port_; }
  // Readable when there may be work for Progress().
  int event_fd() const { return efd_; }

  // Opens an endpoint to a peer's listener and says hello. Messages to the
  // peer may be sent at once: UCX queues them until the connection is up.
  // Errors: kInvalidArgument (address), kUnavailable.
  Status Connect(proto::NodeId peer, const std::string& address);
  bool HasPeer(proto::NodeId peer) const { return peers_.count(peer) != 0; }
  // Changes whenever the endpoint to `peer` is replaced (a failed one gone,
  // a new one connected) or a batch for it could not be sent; 0 when there
  // is none. What went out on one generation either arrives or the
  // generation changes.
  uint64_t PeerGeneration(proto::NodeId peer) const {
    return peers_.count(peer) != 0 ? peer_generation_.at(peer) : 0;
  }

  // Sends one message. For PageData, `data` goes as the AM data (as
  // SendPage). Errors: kUnavailable (no endpoint to that peer),
  // kResourceExhausted (too many sends in flight), kInvalidArgument (page
  // bytes over kMaxPageSize).
  Status Send(proto::NodeId peer, proto::Message message);
  // Sends the page `header` names (its `data` is ignored), whose `length`
  // bytes `fill` writes into the buffer they leave from: the peer's batch
  // when the page is at most batch_page_bytes (the batch goes when full or
  // at FlushBatches()), else a buffer of the page's own. So a page read from
  // the store is copied once before UCX takes it. Errors: as Send; fill's
  // error, and then nothing is sent; kInvalidArgument (length over
  // kMaxPageSize).
  using PageFill = std::function<Status(std::span<uint8_t>)>;
  Status SendPage(proto::NodeId peer, const proto::PageData& header, size_t length,
                  const PageFill& fill);
  // As SendPage, for page bytes that stay as they are until UCX is done
  // with them (a PageStore::LendForSend view; `bytes` is held until then):
  // a page that goes alone leaves from them, with no copy. One that goes in
  // a batch, or waits for a handshake, is copied.
  Status SendPageFrom(proto::NodeId peer, const proto::PageData& header,
                      std::shared_ptr<const uint8_t> bytes, size_t length);
  // Where the bytes of a page that arrives alone by rendezvous should go
  // (`length` of them, for the PageData `header` from node `from`): a
  // buffer that stays valid while it is held, such as a
  // PageStore::ReceiveInPlace view; null: a buffer of the transport's. The
  // page is then delivered in that buffer. Called inside Progress().
  using ReceivePlacer = std::function<std::shared_ptr<uint8_t>(
      proto::NodeId from, const proto::PageData& header, size_t length)>;
  void set_receive_placer(ReceivePlacer placer) { placer_ = std::move(placer); }
  // Sends every batch Send held. Call before the event loop sleeps. A batch
  // that cannot go is dropped and its peer's generation changes (the
  // protocol's retransmissions ask for its pages again).
  void FlushBatches();
  size_t held_batch_pages() const;
  // Pages of at most this many bytes go in batches (UcxOptions).
  size_t batch_page_bytes() const { return options_.batch_page_bytes; }

  // Progresses the worker until it has nothing more to do right now and
  // appends every message received to `in`. Returns the number of messages.
  size_t Progress(std::vector<UcxIncoming>* in);
  // Prepares event_fd() for sleeping. False: events are pending, so call
  // Progress() again before sleeping.
  bool Arm();

  // Waits (progressing) until every send completed, at most timeout_ms.
  // Call before telling a peer you are done (notes/ucx.md, pitfall 9).
  Status Flush(int timeout_ms);

  size_t inflight_sends() const { return inflight_; }
  const UcxStats& stats() const { return stats_; }
  BufferPoolStats buffer_stats() const { return buffers_->stats(); }

 private:
  struct SendRequest;
  struct RecvRequest;
  // The AM data of a send, kept alive until UCX is done with it: a pooled
  // buffer, or the vector of a PageData sent with its bytes.
  struct Payload {
    std::shared_ptr<const uint8_t> bytes;  // null: none
    size_t size = 0;
  };
  // Pages held for one peer, their bytes side by side in a pooled buffer.
  struct Batch {
    proto::PageBatch frame;
    std::shared_ptr<uint8_t> buffer;  // null until the first page
    size_t capacity = 0;
    size_t size = 0;
    // Empties it for the next pages; the page list keeps its room.
    void Clear() {
      frame.pages.clear();
      buffer.reset();
      capacity = size = 0;
    }
  };
  // The UCX context and worker, shared with every received page held in one
  // of the worker's buffers: the last of them to go destroys them, so a page
  // may outlive the transport and still be given back to UCX. The worker's
  // callbacks reach the transport through it.
  struct Handles {
    ucp_context_h context = nullptr;
    ucp_worker_h worker = nullptr;
    UcxTransport* transport = nullptr;  // null once it is gone
    Handles() = default;
    Handles(const Handles&) = delete;
    Handles& operator=(const Handles&) = delete;
    ~Handles();
  };
  // Gives a held receive buffer back to UCX, unless disarmed.
  struct AmDataRelease {
    std::shared_ptr<Handles> handles;
    bool armed = true;
    void operator()(const uint8_t* data) const {
      if (armed) ucp_am_data_release(handles->worker, const_cast<uint8_t*>(data));
    }
  };

  explicit UcxTransport(const UcxOptions& options)
      : options_(options), buffers_(BufferPool::Create(options.kept_buffer_bytes)) {}
  Status Start();
  static void OnConnRequest(ucp_conn_request_h request, void* arg);
  static ucs_status_t OnActiveMessage(void* arg, const void* header, size_t header_length,
                                      void* data, size_t length, const ucp_am_recv_param_t* param);
  static void OnSendDone(void* request, ucs_status_t status, void* user_data);
  static void OnRecvDone(void* request, ucs_status_t status, size_t length, void* user_data);
  static void OnEndpointError(void* arg, ucp_ep_h ep, ucs_status_t status);
  void Deliver(ucp_ep_h from, proto::Message m) { Deliver(from, std::move(m), {}); }
  // The handshake's messages; false when the endpoint was refused.
  void OnPeerHello(ucp_ep_h from, const proto::PeerHello& m);
  void OnPeerChallenge(ucp_ep_h from, const proto::PeerChallenge& m);
  void OnPeerProof(ucp_ep_h from, const proto::PeerProof& m);
  void RefuseEndpoint(ucp_ep_h ep, const std::string& why);
  Status SendOn(ucp_ep_h ep, proto::Message message);
  // `data`: the AM data (PageData's bytes, a batch's); empty for none.
  Status SendFrame(ucp_ep_h ep, const proto::Message& message, Payload data);
  void SendBatch(proto::NodeId peer, Batch& batch);
  // Hands on a received PageData, or each page of a PageBatch as its
  // PageData, with its bytes: the `length` bytes that `buffer` owns.
  void DeliverPages(ucp_ep_h from, proto::Message message, std::shared_ptr<const uint8_t> buffer,
                    size_t length);
  void Deliver(ucp_ep_h from, proto::Message m, ReceivedPage page);
  void ForgetEndpoint(ucp_ep_h ep);

  UcxOptions options_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;  // handles_'s, for short
  std::shared_ptr<Handles> handles_ = std::make_shared<Handles>();
  // Buffers of page bytes sent and received (see kept_buffer_bytes); shared
  // with the pages received in them, which may outlive the transport.
  std::shared_ptr<BufferPool> buffers_;
  ReceivePlacer placer_;
  ucp_listener_h listener_ = nullptr;
  int efd_ = -1;
  uint16_t port_ = 0;
  size_t max_am_header_ = 0;
  std::unordered_map<proto::NodeId, ucp_ep_h> peers_;   // where to send to a node
  std::unordered_map<proto::NodeId, uint64_t> peer_generation_;  // of peers_[node]
  uint64_t next_generation_ = 1;
  // True when the endpoint's peer has proved the cluster secret.
  bool Authenticated(ucp_ep_h ep) const;
  std::unordered_map<ucp_ep_h, proto::NodeId> ep_node_;  // who is behind an endpoint (0: no hello yet)
  // Endpoints in their handshake (proto/auth.h): the nonces, the node (the
  // one connected to, or the one claimed in PeerHello) and, on a connecting
  // endpoint, what is waiting to be sent once the listener has proved itself.
  struct Handshake {
    bool connector = false;
    proto::NodeId node = proto::kNoNode;
    proto::Nonce mine{};
    proto::Nonce theirs{};
    bool have_theirs = false;
    std::vector<proto::Message> held;
  };
  std::unordered_map<ucp_ep_h, Handshake> handshakes_;
  // Queues a message behind an endpoint's handshake, up to
  // max_inflight_sends of them (kResourceExhausted past that).
  Status HoldForHandshake(proto::NodeId peer, Handshake& hs, proto::Message message);
  std::vector<ucp_ep_h> all_eps_;
  std::vector<ucp_ep_h> failed_eps_;                     // closed at the next Progress
  std::vector<UcxIncoming>* sink_ = nullptr;             // valid during Progress
  std::vector<UcxIncoming> late_;                        // completed outside Progress
  std::unordered_map<proto::NodeId, Batch> batches_;     // pages held for FlushBatches
  size_t inflight_ = 0;
  UcxStats stats_;
};

}  // namespace dsvm::node

#endif  // DSVM_NODE_TRANSPORT_UCX_TRANSPORT_H_
