// How libdsvm's C entry points report errors: a DSVM_E* code returned, and
// one sentence for dsvm_last_error() in a per-thread buffer. Internal to
// client/lib; shared by every file that implements part of dsvm.h.
#ifndef DSVM_CLIENT_LIB_API_ERRORS_H_
#define DSVM_CLIENT_LIB_API_ERRORS_H_

#include <dsvm/dsvm.h>

#include <cstdint>
#include <new>
#include <string>

#include "proto/status.h"
#include "proto/text.h"

namespace dsvm::client {

// The text dsvm_last_error() returns for the calling thread.
const char* LastError();
void SetLastError(const std::string& why);

// Clears the thread's error text and returns DSVM_OK.
int Succeed();
// Sets the thread's error text and returns `code`.
int Fail(int code, const std::string& why);
// The DSVM_E* code for a StatusCode.
int CodeOf(StatusCode code);
// `what`: the call and its subject, e.g. "dsvm_region_open('grid')".
int FailWith(const std::string& what, const Status& s);

// Runs an entry point's body; nothing escapes into C.
template <typename F>
int Guarded(const char* what, F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(DSVM_ERESOURCE_EXHAUSTED, std::string(what) + ": out of memory");
  } catch (...) {
    return Fail(DSVM_EINTERNAL, std::string(what) + ": unexpected exception");
  }
}

}  // namespace dsvm::client

#endif  // DSVM_CLIENT_LIB_API_ERRORS_H_
