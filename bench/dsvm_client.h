// libdsvm in a benchmark's client process: a call's result as a Status, and
// the connection to the process's node daemon.
#ifndef DSVM_BENCH_DSVM_CLIENT_H_
#define DSVM_BENCH_DSVM_CLIENT_H_

#include <dsvm/dsvm.h>

#include <string>

#include "proto/status.h"

namespace dsvm::bench {

// A libdsvm call's result as a Status, with the library's own sentence.
inline Status Checked(int rc, const std::string& call) {
  if (rc == DSVM_OK) return Status::Ok();
  return Internal(call + ": " + dsvm_strerror(rc) + ": " + dsvm_last_error());
}

// dsvm_init in a client process; dsvm_finalize when it goes.
class Connection {
 public:
  Connection() = default;
  ~Connection() {
    if (connected_) dsvm_finalize();
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  Status Connect(const std::string& socket) {
    DSVM_RETURN_IF_ERROR(Checked(dsvm_init(socket.c_str()), "dsvm_init(" + socket + ")"));
    connected_ = true;
    return Status::Ok();
  }

 private:
  bool connected_ = false;
};

}  // namespace dsvm::bench

#endif  // DSVM_BENCH_DSVM_CLIENT_H_
