#include "bench/scan_floor.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "bench/bench_output.h"
#include "bench/scan_pattern.h"

namespace dsvm::bench {
namespace {

// Tags of the floor's little protocol: the kind in the top bits.
constexpr ucp_tag_t kTagGo = ucp_tag_t{1} << 60;    // receiver -> sender; low bits: pass
constexpr ucp_tag_t kTagData = ucp_tag_t{2} << 60;  // sender -> receiver; pass << 32 | chunk
constexpr ucp_tag_t kTagBye = ucp_tag_t{3} << 60;   // receiver -> sender: done
constexpr ucp_tag_t kAllBits = ~ucp_tag_t{0};

ucp_tag_t DataTag(int pass, size_t chunk) {
  return kTagData | (static_cast<ucp_tag_t>(pass) << 32) | chunk;
}

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

std::string UcxError(const std::string& what, ucs_status_t s) {
  return what + ": " + ucs_status_string(s);
}

// Operations in flight and how they ended; their callbacks run inside
// ucp_worker_progress on the one thread that uses the worker.
struct Completions {
  size_t done = 0;
  ucs_status_t first_error = UCS_OK;
  size_t wrong_length = 0;  // receives that got another length than posted

  void Add(ucs_status_t s) {
    ++done;
    if (s != UCS_OK && first_error == UCS_OK) first_error = s;
  }
};

void OnSent(void* request, ucs_status_t status, void* user_data) {
  static_cast<Completions*>(user_data)->Add(status);
  ucp_request_free(request);
}

// Receives are posted with the chunk's length as user data's length check:
// the receiver posts exactly the bytes the sender sends.
struct PostedReceive {
  Completions* completions;
  size_t length;
};

void OnReceived(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                void* user_data) {
  auto* r = static_cast<PostedReceive*>(user_data);
  if (status == UCS_OK && info->length != r->length) ++r->completions->wrong_length;
  r->completions->Add(status);
  ucp_request_free(request);
}

void OnEndpointError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* err = static_cast<ucs_status_t*>(arg);
  if (*err == UCS_OK) *err = status;
}

// One process's UCX: context, worker, and its endpoint to the other one.
class UcxSide {
 public:
  ~UcxSide() {
    if (ep_ != nullptr) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;  // the other end may be gone already
      Wait(ucp_ep_close_nbx(ep_, &p)).IgnoreError();
    }
    if (listener_ != nullptr) ucp_listener_destroy(listener_);
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }

  Status Start() {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_config_read", s));
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_TAG;
    s = ucp_init(&p, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_init", s));
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    s = ucp_worker_create(context_, &wp, &worker_);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_worker_create", s));
    return Status::Ok();
  }

  // Listens on 127.0.0.1 (a free port, returned); the first connection
  // request becomes the endpoint.
  Result<uint16_t> Listen() {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    lp.sockaddr.addrlen = sizeof(sa);
    lp.conn_handler.cb = &UcxSide::OnConnRequest;
    lp.conn_handler.arg = this;
    ucs_status_t s = ucp_listener_create(worker_, &lp, &listener_);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_listener_create on 127.0.0.1:0", s));
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    s = ucp_listener_query(listener_, &la);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_listener_query", s));
    return ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  }

  Status Connect(uint16_t port) {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons(port);
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    ep.sockaddr.addrlen = sizeof(sa);
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;  // as dsvm-node's endpoints
    ep.err_handler.cb = &OnEndpointError;
    ep.err_handler.arg = &ep_error_;
    const ucs_status_t s = ucp_ep_create(worker_, &ep, &ep_);
    if (s != UCS_OK)
      return Unavailable(UcxError("connect to 127.0.0.1:" + std::to_string(port), s));
    return Status::Ok();
  }

  // Progresses until the listener has accepted a connection.
  Status AwaitConnection() {
    while (ep_ == nullptr && accept_error_ == UCS_OK) ucp_worker_progress(worker_);
    if (accept_error_ != UCS_OK)
      return Unavailable(UcxError("accepting the sender", accept_error_));
    return Status::Ok();
  }

  // Posts a tag send of [data, data + len); completion is counted in `c`.
  Status Send(const void* data, size_t len, ucp_tag_t tag, Completions* c) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &OnSent;
    p.user_data = c;
    const ucs_status_ptr_t r = ucp_tag_send_nbx(ep_, data, len, tag, &p);
    if (UCS_PTR_IS_ERR(r)) return Internal(UcxError("ucp_tag_send_nbx", UCS_PTR_STATUS(r)));
    if (r == nullptr) c->Add(UCS_OK);  // done at once; no callback comes
    return Status::Ok();
  }

  // Posts a tag receive of exactly `r->length` bytes into `data`.
  Status Receive(void* data, ucp_tag_t tag, PostedReceive* r) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.recv = &OnReceived;
    p.user_data = r;
    const ucs_status_ptr_t req = ucp_tag_recv_nbx(worker_, data, r->length, tag, kAllBits, &p);
    if (UCS_PTR_IS_ERR(req)) return Internal(UcxError("ucp_tag_recv_nbx", UCS_PTR_STATUS(req)));
    if (req == nullptr) r->completions->Add(UCS_OK);
    return Status::Ok();
  }

  // Busy-polls until `c` counts `n` completions, or the endpoint fails.
  Status Progress(const Completions& c, size_t n, const char* what) {
    while (c.done < n && ep_error_ == UCS_OK) ucp_worker_progress(worker_);
    if (ep_error_ != UCS_OK) return Internal(UcxError(std::string(what) + ": endpoint", ep_error_));
    if (c.first_error != UCS_OK) return Internal(UcxError(what, c.first_error));
    if (c.wrong_length != 0) return Internal(std::string(what) + ": a message of the wrong length");
    return Status::Ok();
  }

  // Sends a small control message and waits until it is out.
  Status SendControl(ucp_tag_t tag) {
    Completions c;
    DSVM_RETURN_IF_ERROR(Send(&tag, sizeof(tag), tag, &c));
    return Progress(c, 1, "control message");
  }

  Status ReceiveControl(ucp_tag_t tag) {
    ucp_tag_t got = 0;
    Completions c;
    PostedReceive r{&c, sizeof(got)};
    DSVM_RETURN_IF_ERROR(Receive(&got, tag, &r));
    DSVM_RETURN_IF_ERROR(Progress(c, 1, "control message"));
    return got == tag ? Status::Ok() : Internal("a control message with the wrong contents");
  }

  void ProgressOnce() {
    if (worker_ != nullptr) ucp_worker_progress(worker_);
  }

 private:
  static void OnConnRequest(ucp_conn_request_h request, void* arg) {
    auto* self = static_cast<UcxSide*>(arg);
    if (self->ep_ != nullptr) {
      ucp_listener_reject(self->listener_, request);  // one sender only
      return;
    }
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.conn_request = request;
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &OnEndpointError;
    ep.err_handler.arg = &self->ep_error_;
    self->accept_error_ = ucp_ep_create(self->worker_, &ep, &self->ep_);
  }

  Status Wait(ucs_status_ptr_t request) {
    if (request == nullptr) return Status::Ok();
    if (UCS_PTR_IS_ERR(request)) return Internal(UcxError("UCX", UCS_PTR_STATUS(request)));
    ucs_status_t s;
    while ((s = ucp_request_check_status(request)) == UCS_INPROGRESS) ucp_worker_progress(worker_);
    ucp_request_free(request);
    return s == UCS_OK ? Status::Ok() : Internal(UcxError("UCX", s));
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_listener_h listener_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  ucs_status_t ep_error_ = UCS_OK;
  ucs_status_t accept_error_ = UCS_OK;
};

// An anonymous mapping of `bytes`, unmapped when it goes.
class Buffer {
 public:
  ~Buffer() {
    if (data_ != nullptr) ::munmap(data_, bytes_);
  }
  Status Map(uint64_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return IoError(Errno("mmap of the floor's buffer"));
    data_ = static_cast<uint64_t*>(p);
    bytes_ = bytes;
    return Status::Ok();
  }
  uint64_t* words() const { return data_; }
  uint8_t* bytes() const { return reinterpret_cast<uint8_t*>(data_); }

 private:
  uint64_t* data_ = nullptr;
  uint64_t bytes_ = 0;
};

size_t ChunkCount(const RawBandwidthOptions& o) { return (o.bytes + o.chunk - 1) / o.chunk; }
size_t ChunkLength(const RawBandwidthOptions& o, size_t i) {
  return static_cast<size_t>(std::min<uint64_t>(o.chunk, o.bytes - i * o.chunk));
}

// --- The sender: a forked process ---------------------------------------------

Status RunSender(const RawBandwidthOptions& o, uint16_t port) {
  Buffer source;
  DSVM_RETURN_IF_ERROR(source.Map(o.bytes));
  FillWords(source.words(), o.bytes / 8, o.seed);
  UcxSide ucx;
  DSVM_RETURN_IF_ERROR(ucx.Start());
  DSVM_RETURN_IF_ERROR(ucx.Connect(port));
  const size_t chunks = ChunkCount(o);
  for (int pass = 0; pass < o.warmup_passes + o.passes; ++pass) {
    DSVM_RETURN_IF_ERROR(ucx.ReceiveControl(kTagGo | static_cast<ucp_tag_t>(pass)));
    Completions sent;
    for (size_t i = 0; i < chunks; ++i) {
      // Keep at most `window` in flight: wait for the oldest beyond it.
      if (i >= o.window) DSVM_RETURN_IF_ERROR(ucx.Progress(sent, i - o.window + 1, "send"));
      DSVM_RETURN_IF_ERROR(
          ucx.Send(source.bytes() + i * o.chunk, ChunkLength(o, i), DataTag(pass, i), &sent));
    }
    DSVM_RETURN_IF_ERROR(ucx.Progress(sent, chunks, "send"));
  }
  // Every send completed (a rendezvous send completes once the data is in),
  // so nothing is left to flush: the receiver said it is done.
  return ucx.ReceiveControl(kTagBye);
}

[[noreturn]] void SenderMain(const RawBandwidthOptions& o, int sock) {
  uint16_t port = 0;
  Status st = ::read(sock, &port, sizeof(port)) == sizeof(port)
                  ? RunSender(o, port)
                  : IoError("the floor's sender: no port from the receiver");
  if (!st.ok()) {
    std::fprintf(stderr, "dsvm-bench: scan floor: sender: %s\n", st.ToString().c_str());
    std::fflush(stderr);
    ::_exit(3);
  }
  ::_exit(0);
}

// --- The receiver: the calling process ----------------------------------------

Status Receive(const RawBandwidthOptions& o, int sock, UcxSide& ucx, std::vector<double>* seconds) {
  Buffer sink;
  DSVM_RETURN_IF_ERROR(sink.Map(o.bytes));
  const ScanSum expected = ExpectedSum(o.seed, o.bytes / 8);
  DSVM_RETURN_IF_ERROR(ucx.Start());
  DSVM_ASSIGN_OR_RETURN(uint16_t port, ucx.Listen());
  if (::write(sock, &port, sizeof(port)) != sizeof(port)) {
    return IoError(Errno("telling the floor's sender the port"));
  }
  DSVM_RETURN_IF_ERROR(ucx.AwaitConnection());

  const size_t chunks = ChunkCount(o);
  std::vector<PostedReceive> posted(chunks);
  for (int pass = 0; pass < o.warmup_passes + o.passes; ++pass) {
    std::memset(sink.bytes(), 0, o.bytes);  // and every page is present before the clock starts
    Completions received;
    for (size_t i = 0; i < chunks; ++i) {
      posted[i] = PostedReceive{&received, ChunkLength(o, i)};
      DSVM_RETURN_IF_ERROR(ucx.Receive(sink.bytes() + i * o.chunk, DataTag(pass, i), &posted[i]));
    }
    const auto start = Clock::now();
    DSVM_RETURN_IF_ERROR(ucx.SendControl(kTagGo | static_cast<ucp_tag_t>(pass)));
    DSVM_RETURN_IF_ERROR(ucx.Progress(received, chunks, "receive"));
    const double s = SecondsBetween(start, Clock::now());
    if (SumWords(sink.words(), o.bytes / 8) != expected) {
      const size_t at = FirstWrongWord(sink.words(), o.bytes / 8, o.seed);
      return Internal("floor: pass " + std::to_string(pass) + ": wrong bytes at offset " +
                      std::to_string(at * 8));
    }
    if (pass >= o.warmup_passes) seconds->push_back(s);
  }
  return ucx.SendControl(kTagBye);
}

}  // namespace

Status MeasureRawBandwidth(const RawBandwidthOptions& o, std::vector<double>* seconds) {
  if (o.bytes == 0 || o.bytes % 8 != 0 || o.chunk == 0 || o.window == 0 || o.passes <= 0) {
    return InvalidArgument("raw bandwidth: nothing sensible to measure");
  }
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return IoError(Errno("socketpair"));
  }
  // The sender forks before this process starts UCX, so it inherits none
  // of UCX's threads or state.
  std::fflush(stderr);
  const pid_t parent = ::getpid();
  const pid_t sender = ::fork();
  if (sender < 0) return IoError(Errno("fork"));
  if (sender == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    ::close(sv[0]);
    SenderMain(o, sv[1]);
  }
  ::close(sv[1]);
  UcxSide ucx;  // outlives the sender: its endpoint closes first
  Status st = Receive(o, sv[0], ucx, seconds);
  ::close(sv[0]);
  if (!st.ok()) ::kill(sender, SIGKILL);
  int wstatus = 0;
  // Progressing meanwhile lets the sender's endpoint close cleanly.
  for (pid_t r; (r = ::waitpid(sender, &wstatus, WNOHANG)) != sender;) {
    if (r < 0 && errno != EINTR) return IoError(Errno("waitpid"));
    ucx.ProgressOnce();
  }
  DSVM_RETURN_IF_ERROR(st);
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) {
    return Internal("floor: the sender process failed (see above)");
  }
  return Status::Ok();
}

}  // namespace dsvm::bench
