// Status and Result<T>: the one error type used everywhere in dsvm.
//
// No exceptions cross module boundaries. A function that can fail returns
// Status (or Result<T> when it also produces a value); both are [[nodiscard]],
// and a deliberate drop is spelled .IgnoreError() so it can be found.
// Programmer errors are not Status: they crash through DSVM_CHECK.
#ifndef DSVM_PROTO_STATUS_H_
#define DSVM_PROTO_STATUS_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace dsvm {

// Add a code only when a caller reacts to it differently from the others.
// The numeric values travel on the wire (proto ErrorReply): never renumber.
enum class StatusCode : uint16_t {
  kOk = 0,
  kInvalidArgument = 1,   // the caller's input is malformed or out of range
  kNotFound = 2,          // no such region, node or page
  kAlreadyExists = 3,     // a region of that name exists
  kPermissionDenied = 4,  // credentials or secret refused
  kUnavailable = 5,       // peer unreachable or not serving yet; retry later
  kDataLoss = 6,          // a page's only copy was on a node that died
  kCorruption = 7,        // stored or received bytes fail validation
  kIoError = 8,           // the disk or the OS refused an operation
  kResourceExhausted = 9, // a bound was reached (memory, queue, address space)
  kFailedPrecondition = 10,  // valid request, wrong state for it
  kInternal = 11,         // a bug on the other side; details in the message
};

// Highest valid StatusCode value, for decoders that validate codes.
inline constexpr uint16_t kMaxStatusCode = static_cast<uint16_t>(StatusCode::kInternal);

std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "CODE: message", for logs and error replies.
  std::string ToString() const;

  // Marks a Status as deliberately ignored.
  void IgnoreError() const {}

  bool operator==(const Status& other) const {
    return code_ == other.code_ && message_ == other.message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) { return Status(StatusCode::kInvalidArgument, std::move(m)); }
inline Status NotFound(std::string m) { return Status(StatusCode::kNotFound, std::move(m)); }
inline Status AlreadyExists(std::string m) { return Status(StatusCode::kAlreadyExists, std::move(m)); }
inline Status PermissionDenied(std::string m) { return Status(StatusCode::kPermissionDenied, std::move(m)); }
inline Status Unavailable(std::string m) { return Status(StatusCode::kUnavailable, std::move(m)); }
inline Status DataLoss(std::string m) { return Status(StatusCode::kDataLoss, std::move(m)); }
inline Status Corruption(std::string m) { return Status(StatusCode::kCorruption, std::move(m)); }
inline Status IoError(std::string m) { return Status(StatusCode::kIoError, std::move(m)); }
inline Status ResourceExhausted(std::string m) { return Status(StatusCode::kResourceExhausted, std::move(m)); }
inline Status FailedPrecondition(std::string m) { return Status(StatusCode::kFailedPrecondition, std::move(m)); }
inline Status Internal(std::string m) { return Status(StatusCode::kInternal, std::move(m)); }

// A value or the Status that explains why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    if (std::get<Status>(v_).ok()) {
      std::fprintf(stderr, "dsvm: Result constructed from an OK Status\n");
      std::abort();
    }
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return Get(); }
  const T& value() const& { return const_cast<Result*>(this)->Get(); }
  T&& value() && { return std::move(Get()); }
  T* operator->() { return &Get(); }
  const T* operator->() const { return &const_cast<Result*>(this)->Get(); }
  T& operator*() & { return Get(); }
  const T& operator*() const& { return const_cast<Result*>(this)->Get(); }

 private:
  T& Get() {
    if (!ok()) {
      std::fprintf(stderr, "dsvm: value() of a failed Result: %s\n",
                   std::get<Status>(v_).ToString().c_str());
      std::abort();
    }
    return std::get<T>(v_);
  }
  std::variant<T, Status> v_;
};

[[noreturn]] void CheckFailed(const char* file, int line, const char* expr, const std::string& msg);

}  // namespace dsvm

// Programmer errors crash; they never limp on.
#define DSVM_CHECK(cond)                                         \
  do {                                                           \
    if (!(cond)) ::dsvm::CheckFailed(__FILE__, __LINE__, #cond, ""); \
  } while (0)
#define DSVM_CHECK_MSG(cond, msg)                                   \
  do {                                                              \
    if (!(cond)) ::dsvm::CheckFailed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)

// Early-return helpers for Status and Result<T>.
#define DSVM_RETURN_IF_ERROR(expr)             \
  do {                                         \
    ::dsvm::Status dsvm_status_ = (expr);      \
    if (!dsvm_status_.ok()) return dsvm_status_; \
  } while (0)

#define DSVM_CONCAT_INNER_(a, b) a##b
#define DSVM_CONCAT_(a, b) DSVM_CONCAT_INNER_(a, b)
#define DSVM_ASSIGN_OR_RETURN(lhs, expr)                                 \
  auto DSVM_CONCAT_(dsvm_result_, __LINE__) = (expr);                    \
  if (!DSVM_CONCAT_(dsvm_result_, __LINE__).ok())                        \
    return DSVM_CONCAT_(dsvm_result_, __LINE__).status();                \
  lhs = std::move(DSVM_CONCAT_(dsvm_result_, __LINE__)).value()

#endif  // DSVM_PROTO_STATUS_H_
