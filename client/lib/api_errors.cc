#include "client/lib/api_errors.h"

#include <cinttypes>
#include <cstdio>

namespace dsvm::client {
namespace {

// A plain array, not a std::string: dsvm_finalize may run from a static
// destructor, after the main thread's thread_local objects are destroyed.
thread_local char t_last_error[2048];

}  // namespace

const char* LastError() { return t_last_error; }

void SetLastError(const std::string& why) {
  std::snprintf(t_last_error, sizeof(t_last_error), "%s", why.c_str());
}

int Succeed() {
  t_last_error[0] = '\0';
  return DSVM_OK;
}

int Fail(int code, const std::string& why) {
  SetLastError(why);
  return code;
}

int CodeOf(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return DSVM_OK;
    case StatusCode::kInvalidArgument:
      return DSVM_EINVALID_ARGUMENT;
    case StatusCode::kNotFound:
      return DSVM_ENOT_FOUND;
    case StatusCode::kAlreadyExists:
      return DSVM_EALREADY_EXISTS;
    case StatusCode::kPermissionDenied:
      return DSVM_EPERMISSION_DENIED;
    case StatusCode::kUnavailable:
      return DSVM_EUNAVAILABLE;
    case StatusCode::kDataLoss:
      return DSVM_EDATA_LOSS;
    case StatusCode::kCorruption:
      return DSVM_ECORRUPTION;
    case StatusCode::kIoError:
      return DSVM_EIO;
    case StatusCode::kResourceExhausted:
      return DSVM_ERESOURCE_EXHAUSTED;
    case StatusCode::kFailedPrecondition:
      return DSVM_EFAILED_PRECONDITION;
    case StatusCode::kInternal:
      return DSVM_EINTERNAL;
  }
  return DSVM_EINTERNAL;
}

int FailWith(const std::string& what, const Status& s) {
  return Fail(CodeOf(s.code()), what + ": " + s.message());
}

}  // namespace dsvm::client
