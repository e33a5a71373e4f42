// dsvm-coordinator: membership, regions and one shard of the page directory.
//
//   dsvm-coordinator --data-dir DIR (--secret-file FILE | --insecure)
//                    [--listen HOST:PORT] [--port-file FILE]
//                    [--shard I --shard-count N [--region-authority HOST:PORT]]
//                    [--heartbeat-ms MS] [--dead-after-ms MS] [--directory-sync]
//                    [--busy-poll-us N] [--verbose]
//
// --region-authority HOST:PORT: shard 0's address, required on every other
// shard of a cluster of several (and refused on shard 0). Shard 0 decides
// regions and node ids; this shard follows its region table over a
// connection of its own (coordinator/net/region_follower.h), authenticated
// with the same cluster secret, and refuses region requests.
// --busy-poll-us N: after any work, poll the sockets for N microseconds
// before sleeping (default 0: sleep at once). Every directory transaction
// passes through here, so this saves a wakeup on every remote fault.
// --secret-file (or $DSVM_SECRET_FILE): the cluster secret every node and
// tool must prove (proto/auth.h). --insecure accepts anyone who reaches the
// port; it must be asked for, so no cluster runs open by accident.
//
// Exits 1 with a clear message when it cannot start (bad flag, unusable or
// corrupt data directory, address in use). SIGINT/SIGTERM stop it cleanly.
#include <utility>  // before Asio: Boost 1.74 awaitable.hpp needs std::exchange under C++20
#include <boost/asio.hpp>
#include <sched.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>

#include "coordinator/net/region_follower.h"
#include "coordinator/net/server.h"
#include "coordinator/service/coordinator_service.h"
#include "coordinator/storage/store.h"
#include "proto/log.h"

namespace {

using namespace dsvm;
using namespace dsvm::coordinator;

// Runs the loop until it stops. With busy_poll_us > 0 it polls (without
// sleeping) for that long after the last handler that ran, then blocks.
void RunLoop(boost::asio::io_context& io, uint32_t busy_poll_us) {
  if (busy_poll_us == 0) {
    io.run();
    return;
  }
  using Clock = std::chrono::steady_clock;
  const auto window = std::chrono::microseconds(busy_poll_us);
  auto last_work = Clock::now();
  while (!io.stopped()) {
    if (io.poll() > 0) {
      last_work = Clock::now();
    } else if (Clock::now() - last_work > window) {
      io.run_one();
      last_work = Clock::now();
    } else {
      sched_yield();  // polling: let a process with work have this core
    }
  }
}

int Usage(const std::string& why) {
  std::fprintf(stderr,
               "dsvm-coordinator: %s\n"
               "usage: dsvm-coordinator --data-dir DIR (--secret-file FILE | --insecure)\n"
               "       [--listen HOST:PORT] [--port-file FILE]\n"
               "       [--shard I --shard-count N [--region-authority HOST:PORT]]\n"
               "       [--heartbeat-ms MS] [--dead-after-ms MS]\n"
               "       [--directory-sync] [--busy-poll-us N] [--verbose]\n",
               why.c_str());
  return 2;
}

bool ParseU32(const std::string& s, uint32_t* out) {
  if (s.empty() || s.size() > 10) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > UINT32_MAX) return false;
  *out = static_cast<uint32_t>(v);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  SetLogIdentity("dsvm-coordinator");
  std::string data_dir, port_file;
  ServerOptions server_options;
  ServiceOptions service_options;
  StoreOptions store_options;
  std::string secret_flag;
  bool insecure = false;
  uint32_t busy_poll_us = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    auto number = [&](uint32_t* out) {
      std::string v;
      return value(&v) && ParseU32(v, out);
    };
    bool ok = true;
    if (a == "--data-dir") ok = value(&data_dir);
    else if (a == "--listen") ok = value(&server_options.listen);
    else if (a == "--port-file") ok = value(&port_file);
    else if (a == "--shard") ok = number(&service_options.shard);
    else if (a == "--shard-count") ok = number(&service_options.shard_count);
    else if (a == "--region-authority") ok = value(&service_options.region_authority);
    else if (a == "--heartbeat-ms") ok = number(&service_options.heartbeat_interval_ms);
    else if (a == "--dead-after-ms") ok = number(&service_options.dead_after_ms);
    else if (a == "--directory-sync") store_options.sync_directory = true;
    else if (a == "--secret-file") ok = value(&secret_flag);
    else if (a == "--insecure") insecure = true;
    else if (a == "--busy-poll-us") ok = number(&busy_poll_us);
    else if (a == "--verbose") SetLogLevel(LogLevel::kDebug);
    else return Usage("unknown flag '" + a + "'");
    if (!ok) return Usage("flag '" + a + "' needs a valid value");
  }
  if (data_dir.empty()) return Usage("--data-dir is required");
  if (service_options.heartbeat_interval_ms == 0 ||
      service_options.dead_after_ms <= service_options.heartbeat_interval_ms) {
    return Usage("--dead-after-ms must exceed --heartbeat-ms, and both be positive");
  }

  if (service_options.shard_count > 1 && service_options.shard > 0) {
    if (service_options.region_authority.empty()) {
      return Usage("shard " + std::to_string(service_options.shard) +
                   " needs --region-authority HOST:PORT, the address of shard 0 (which decides "
                   "regions and node ids)");
    }
    std::string host;
    uint16_t authority_port = 0;
    Status st = proto::ParseHostPort(service_options.region_authority, &host, &authority_port);
    if (!st.ok()) return Usage("--region-authority: " + st.message());
  } else if (!service_options.region_authority.empty()) {
    return Usage("--region-authority is for shards 1 to N-1 of N > 1; shard 0 is the authority");
  }

  const std::string secret_path = proto::SecretPath(secret_flag);
  if (secret_path.empty() && !insecure) {
    return Usage("give the cluster secret (--secret-file, or $DSVM_SECRET_FILE), or --insecure");
  }
  if (!secret_path.empty() && insecure) return Usage("--insecure with a cluster secret");
  std::optional<proto::ClusterSecret> secret;
  if (!secret_path.empty()) {
    auto loaded = proto::ClusterSecret::Load(secret_path);
    if (!loaded.ok()) {
      LogError("refusing to start: " + loaded.status().ToString());
      return 1;
    }
    secret = std::move(*loaded);
    server_options.secret = &*secret;
  } else {
    LogWarning("--insecure: any process that reaches the port may join and read every region");
  }

  auto store = Store::Open(data_dir, store_options);
  if (!store.ok()) {
    LogError("refusing to start: " + store.status().ToString());
    return 1;
  }
  service_options.tick_ms = server_options.tick_ms;  // the server calls OnTick this often
  auto service = CoordinatorService::Create(std::move(*store), service_options, MonotonicMs());
  if (!service.ok()) {
    LogError("refusing to start: " + service.status().ToString());
    return 1;
  }

  boost::asio::io_context io;
  Server server(io, **service, server_options);
  auto port = server.Start();
  if (!port.ok()) {
    LogError("refusing to start: " + port.status().ToString());
    return 1;
  }
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    {
      std::ofstream f(tmp);
      f << *port << "\n";
    }
    if (std::rename(tmp.c_str(), port_file.c_str()) != 0) {
      LogError("cannot write --port-file " + port_file);
      return 1;
    }
  }
  LogInfo("listening on port " + std::to_string(*port) + ", shard " +
          std::to_string(service_options.shard) + " of " +
          std::to_string(service_options.shard_count) + ", data in " + data_dir);
  std::optional<RegionFollower> follower;
  if (!service_options.region_authority.empty()) {
    LogInfo("following the region table of shard 0 at " + service_options.region_authority);
    follower.emplace(io, **service, service_options.region_authority,
                     secret ? &*secret : nullptr);
    follower->Start();
  }

  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) return;
    LogInfo("signal " + std::to_string(sig) + ": stopping");
    server.Stop();
    io.stop();
  });
  std::signal(SIGPIPE, SIG_IGN);
  RunLoop(io, busy_poll_us);
  // Before the service and io go: its posted handlers name them (those
  // still queued are dropped unrun with io).
  if (follower) follower->Stop();

  std::vector<Send> unsent;
  Status st = (*service)->Flush(&unsent);
  if (!st.ok()) LogError("final directory write failed: " + st.ToString());
  return 0;
}
