// Hooks for libdsvm's own tests; not part of the public API.
#ifndef DSVM_CLIENT_LIB_CLIENT_TESTING_H_
#define DSVM_CLIENT_LIB_CLIENT_TESTING_H_

#include <chrono>

namespace dsvm::client {

// The longest libdsvm waits for the daemon to take or answer one request
// (default kDefaultRequestTimeout), for connections dsvm_init opens from now
// on. A test sets it short to see a silent daemon's timeout quickly.
inline constexpr std::chrono::milliseconds kDefaultRequestTimeout{60000};
void SetRequestTimeoutForTesting(std::chrono::milliseconds timeout);

}  // namespace dsvm::client

#endif  // DSVM_CLIENT_LIB_CLIENT_TESTING_H_
