#include "bench/fault_floor.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <thread>

#include "bench/fault_timing.h"

namespace dsvm::bench {
namespace {

// Active-message ids of the floor's own little protocol.
constexpr unsigned kAmRequest = 1;  // faulter -> peer; header: page index
constexpr unsigned kAmReply = 2;    // peer -> faulter; header: page index; data: the page
constexpr unsigned kAmBye = 3;      // faulter -> peer: stop serving

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// A fatal error where no caller can take it (the fault handler thread, the
// peer): the faulting thread would wait forever, so the process ends.
[[noreturn]] void Die(const std::string& why) {
  std::fprintf(stderr, "dsvm-bench: fault-latency floor: %s\n", why.c_str());
  std::fflush(stderr);
  ::_exit(3);
}

std::string UcxError(const char* what, ucs_status_t s) {
  return std::string(what) + ": " + ucs_status_string(s);
}

// One UCX context, worker and endpoint to the other process.
struct UcxEnd {
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  ucp_ep_h ep = nullptr;
  int efd = -1;  // the worker's event fd, when started with wakeup

  // `wakeup`: the worker gets an event fd to sleep on (Sleep()).
  Status Start(bool wakeup) {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_config_read", s));
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_AM | (wakeup ? UCP_FEATURE_WAKEUP : 0);
    s = ucp_init(&p, config, &context);
    ucp_config_release(config);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_init", s));
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;  // one thread at a time uses it
    s = ucp_worker_create(context, &wp, &worker);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_worker_create", s));
    if (wakeup) {
      s = ucp_worker_get_efd(worker, &efd);
      if (s != UCS_OK) return Unavailable(UcxError("ucp_worker_get_efd", s));
    }
    return Status::Ok();
  }

  // Sleeps until the worker may have work: arm, then poll its event fd.
  // Returns at once when events are pending already.
  void Sleep() {
    const ucs_status_t s = ucp_worker_arm(worker);
    if (s == UCS_ERR_BUSY) return;
    if (s != UCS_OK) Die(UcxError("ucp_worker_arm", s));
    pollfd p{efd, POLLIN, 0};
    while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
    }
  }

  // Exchanges worker addresses over `sock` and connects to the other end.
  Status Connect(int sock) {
    ucp_address_t* mine = nullptr;
    size_t mine_len = 0;
    ucs_status_t s = ucp_worker_get_address(worker, &mine, &mine_len);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_worker_get_address", s));
    const uint64_t len = mine_len;
    const bool sent = ::write(sock, &len, 8) == 8 &&
                      ::write(sock, mine, mine_len) == static_cast<ssize_t>(mine_len);
    ucp_worker_release_address(worker, mine);
    if (!sent) return IoError(Errno("sending the UCX worker address"));
    uint64_t their_len = 0;
    if (::read(sock, &their_len, 8) != 8 || their_len == 0 || their_len > (1u << 20)) {
      return IoError("receiving the other end's UCX worker address");
    }
    std::vector<uint8_t> theirs(their_len);
    size_t got = 0;
    while (got < their_len) {
      const ssize_t n = ::read(sock, theirs.data() + got, their_len - got);
      if (n <= 0) return IoError("receiving the other end's UCX worker address");
      got += static_cast<size_t>(n);
    }
    ucp_ep_params_t ep_params{};
    ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    ep_params.address = reinterpret_cast<const ucp_address_t*>(theirs.data());
    s = ucp_ep_create(worker, &ep_params, &ep);
    if (s != UCS_OK) return Unavailable(UcxError("ucp_ep_create", s));
    return Status::Ok();
  }

  void SetHandler(unsigned id, ucp_am_recv_callback_t cb, void* arg) {
    ucp_am_handler_param_t p{};
    p.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                   UCP_AM_HANDLER_PARAM_FIELD_ARG;
    p.id = id;
    p.cb = cb;
    p.arg = arg;
    const ucs_status_t s = ucp_worker_set_am_recv_handler(worker, &p);
    if (s != UCS_OK) Die(UcxError("ucp_worker_set_am_recv_handler", s));
  }

  // Progresses (busy) until `request` completes; frees it.
  ucs_status_t Wait(ucs_status_ptr_t request) {
    if (request == nullptr) return UCS_OK;
    if (UCS_PTR_IS_ERR(request)) return UCS_PTR_STATUS(request);
    ucs_status_t s;
    while ((s = ucp_request_check_status(request)) == UCS_INPROGRESS) ucp_worker_progress(worker);
    ucp_request_free(request);
    return s;
  }

  ucs_status_t Send(unsigned id, const void* header, size_t header_len, const void* data,
                    size_t len) {
    ucp_request_param_t p{};
    return Wait(ucp_am_send_nbx(ep, id, header, header_len, data, len, &p));
  }

  // Flushes the endpoint first (notes pitfall 9), then closes it.
  void Close() {
    if (ep != nullptr) {
      ucp_request_param_t p{};
      Wait(ucp_ep_flush_nbx(ep, &p));
      ucp_request_param_t c{};
      c.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      c.flags = UCP_EP_CLOSE_FLAG_FORCE;  // the other end may be gone already
      Wait(ucp_ep_close_nbx(ep, &c));
      ep = nullptr;
    }
    if (worker != nullptr) ucp_worker_destroy(worker);
    if (context != nullptr) ucp_cleanup(context);
    worker = nullptr;
    context = nullptr;
  }
};

// --- The peer: holds the pages, busy-polls, answers requests ---------------

struct PeerState {
  size_t pages = 0;
  bool blocking = false;
  std::deque<uint64_t> requests;  // at most one outstanding in practice; bounded below
  bool bye = false;
};

ucs_status_t PeerOnRequest(void* arg, const void* header, size_t header_length, void*, size_t,
                           const ucp_am_recv_param_t*) {
  auto* st = static_cast<PeerState*>(arg);
  uint64_t page = UINT64_MAX;
  if (header_length == 8) std::memcpy(&page, header, 8);
  if (page >= st->pages) Die("peer: request for page " + std::to_string(page) + ", not ours");
  if (st->requests.size() >= 1024) Die("peer: more than 1024 requests outstanding");
  st->requests.push_back(page);
  return UCS_OK;
}

ucs_status_t PeerOnBye(void* arg, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) {
  static_cast<PeerState*>(arg)->bye = true;
  return UCS_OK;
}

[[noreturn]] void RunPeer(int sock, size_t pages, bool blocking) {
  std::vector<uint64_t> bytes(pages * kWordsPerPage);
  for (size_t p = 0; p < pages; ++p) {
    for (size_t w = 0; w < kWordsPerPage; ++w) bytes[p * kWordsPerPage + w] = PatternWord(p, w);
  }
  UcxEnd ucx;
  Status st = ucx.Start(blocking);
  if (st.ok()) st = ucx.Connect(sock);
  if (!st.ok()) Die("peer: " + st.ToString());
  PeerState state;
  state.pages = pages;
  state.blocking = blocking;
  ucx.SetHandler(kAmRequest, PeerOnRequest, &state);
  ucx.SetHandler(kAmBye, PeerOnBye, &state);
  // Ready: the faulter may send requests from now on.
  const char ready = 'r';
  if (::write(sock, &ready, 1) != 1) Die(Errno("peer: write"));
  while (!state.bye) {
    const unsigned progressed = ucp_worker_progress(ucx.worker);  // busy: notes pitfall 1
    while (!state.requests.empty()) {
      const uint64_t page = state.requests.front();
      state.requests.pop_front();
      const ucs_status_t s =
          ucx.Send(kAmReply, &page, sizeof(page), &bytes[page * kWordsPerPage], kFaultPageSize);
      if (s != UCS_OK) Die(UcxError("peer: reply", s));
    }
    if (state.blocking && progressed == 0 && !state.bye) ucx.Sleep();
  }
  ucx.Close();
  ::_exit(0);
}

// --- The faulting process ----------------------------------------------------

struct FaulterState {
  UcxEnd* ucx = nullptr;
  bool blocking = false;
  uint64_t expected = UINT64_MAX;  // the page whose reply is awaited
  bool ready = false;
  void* rndv_request = nullptr;  // a rendezvous receive in flight
  alignas(64) uint8_t page[kFaultPageSize];
};

ucs_status_t FaulterOnReply(void* arg, const void* header, size_t header_length, void* data,
                            size_t length, const ucp_am_recv_param_t* param) {
  auto* st = static_cast<FaulterState*>(arg);
  uint64_t page = UINT64_MAX;
  if (header_length == 8) std::memcpy(&page, header, 8);
  if (page != st->expected || length != kFaultPageSize) {
    Die("reply for page " + std::to_string(page) + " (" + std::to_string(length) +
        " bytes) while waiting for page " + std::to_string(st->expected));
  }
  if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
    ucp_request_param_t p{};
    ucs_status_ptr_t r = ucp_am_recv_data_nbx(st->ucx->worker, data, st->page, length, &p);
    if (UCS_PTR_IS_ERR(r)) Die(UcxError("ucp_am_recv_data_nbx", UCS_PTR_STATUS(r)));
    if (r == nullptr) {
      st->ready = true;
    } else {
      st->rndv_request = r;
    }
    return UCS_OK;
  }
  std::memcpy(st->page, data, length);
  st->ready = true;
  return UCS_OK;
}

// The handler thread: sleeps until a fault or `stop_fd`; serves each fault
// from the peer. Leaves the process on any error.
void ServeFaults(int uffd, int stop_fd, uintptr_t base, size_t pages, FaulterState* st) {
  for (;;) {
    pollfd fds[2] = {{uffd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Die(Errno("poll"));
    }
    if (fds[1].revents != 0) return;
    for (;;) {
      uffd_msg msg;
      const ssize_t n = ::read(uffd, &msg, sizeof(msg));
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
      if (n != sizeof(msg)) Die(Errno("read userfaultfd"));
      if (msg.event != UFFD_EVENT_PAGEFAULT) Die("unexpected userfaultfd event");
      const uintptr_t addr = msg.arg.pagefault.address & ~uintptr_t{kFaultPageSize - 1};
      const uint64_t page = (addr - base) / kFaultPageSize;
      if (addr < base || page >= pages) Die("fault outside the region");
      st->expected = page;
      st->ready = false;
      ucs_status_t s = st->ucx->Send(kAmRequest, &page, sizeof(page), nullptr, 0);
      if (s != UCS_OK) Die(UcxError("request", s));
      while (!st->ready) {
        const unsigned progressed =
            ucp_worker_progress(st->ucx->worker);  // busy until the page is in
        if (st->rndv_request != nullptr &&
            ucp_request_check_status(st->rndv_request) != UCS_INPROGRESS) {
          s = ucp_request_check_status(st->rndv_request);
          ucp_request_free(st->rndv_request);
          st->rndv_request = nullptr;
          if (s != UCS_OK) Die(UcxError("rendezvous receive", s));
          st->ready = true;
        }
        if (st->blocking && !st->ready && progressed == 0) st->ucx->Sleep();
      }
      uffdio_copy copy{};
      copy.dst = addr;
      copy.src = reinterpret_cast<uintptr_t>(st->page);
      copy.len = kFaultPageSize;
      copy.mode = 0;  // and wake the faulting thread
      if (::ioctl(uffd, UFFDIO_COPY, &copy) != 0 && errno != EEXIST) Die(Errno("UFFDIO_COPY"));
    }
  }
}

int CreateUffd() {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd < 0) {
    fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  }
  return fd;
}

Status CheckPage(const uint8_t* base, size_t page) {
  const auto* words = reinterpret_cast<const uint64_t*>(base + page * kFaultPageSize);
  for (size_t w = 0; w < kWordsPerPage; ++w) {
    if (words[w] != PatternWord(page, w)) {
      return Internal("floor: page " + std::to_string(page) + " word " + std::to_string(w) +
                      " reads wrong");
    }
  }
  return Status::Ok();
}

}  // namespace

Status MeasureFaultFloor(const FloorOptions& options, std::vector<double>* micros) {
  const size_t pages = options.pages + options.warmup_pages;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return IoError(Errno("socketpair"));
  const pid_t parent = ::getpid();
  const pid_t peer = ::fork();
  if (peer < 0) return IoError(Errno("fork"));
  if (peer == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(126);
    ::close(sv[0]);
    RunPeer(sv[1], pages, options.blocking);
  }
  ::close(sv[1]);
  const int sock = sv[0];
  auto reap_peer = [&](bool kill_it) {
    if (kill_it) ::kill(peer, SIGKILL);
    int wstatus = 0;
    ::waitpid(peer, &wstatus, 0);
    return WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0;
  };

  UcxEnd ucx;
  Status st = ucx.Start(options.blocking);
  if (st.ok()) st = ucx.Connect(sock);
  char ready = 0;
  if (st.ok() && ::read(sock, &ready, 1) != 1) st = Internal("the floor's peer failed to start");
  if (!st.ok()) {
    reap_peer(true);
    return st;
  }
  FaulterState state;
  state.ucx = &ucx;
  state.blocking = options.blocking;
  ucx.SetHandler(kAmReply, FaulterOnReply, &state);

  const size_t bytes = pages * kFaultPageSize;
  void* region = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) return IoError(Errno("mmap"));
  const int uffd = CreateUffd();
  if (uffd < 0) {
    reap_peer(true);
    return Unavailable(Errno("userfaultfd"));
  }
  uffdio_api api{};
  api.api = UFFD_API;
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uintptr_t>(region);
  reg.range.len = bytes;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (::ioctl(uffd, UFFDIO_API, &api) != 0 || ::ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) {
    reap_peer(true);
    return Unavailable(Errno("userfaultfd API/REGISTER"));
  }
  const int stop_fd = ::eventfd(0, EFD_CLOEXEC);
  const auto base = reinterpret_cast<uintptr_t>(region);
  std::thread handler(ServeFaults, uffd, stop_fd, base, pages, &state);

  auto* mem = static_cast<uint8_t*>(region);
  // Warm-up: the first messages set up UCX's connection; not timed, but checked.
  for (size_t p = options.pages; p < pages && st.ok(); ++p) {
    double unused;
    if (TimedLoad(mem + p * kFaultPageSize, &unused) != PatternWord(p, 0)) {
      st = Internal("floor: warm-up page " + std::to_string(p) + " reads wrong");
    }
  }
  micros->assign(options.pages, 0);
  for (size_t p = 0; p < options.pages && st.ok(); ++p) {
    if (TimedLoad(mem + p * kFaultPageSize, &(*micros)[p]) != PatternWord(p, 0)) {
      st = Internal("floor: page " + std::to_string(p) + " word 0 reads wrong");
    }
  }
  for (size_t p = 0; p < pages && st.ok(); ++p) st = CheckPage(mem, p);

  const uint64_t one = 1;
  if (::write(stop_fd, &one, 8) != 8) Die(Errno("write eventfd"));
  handler.join();
  const ucs_status_t s = ucx.Send(kAmBye, nullptr, 0, nullptr, 0);
  ucx.Close();
  const bool peer_ok = reap_peer(false);
  ::close(uffd);
  ::close(stop_fd);
  ::close(sock);
  ::munmap(region, bytes);
  DSVM_RETURN_IF_ERROR(st);
  if (s != UCS_OK) return Internal(UcxError("floor: bye to the peer", s));
  if (!peer_ok) return Internal("floor: the peer process failed (see above)");
  return Status::Ok();
}

}  // namespace dsvm::bench
