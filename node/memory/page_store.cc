#include "node/memory/page_store.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <cstring>
#include <vector>

#include "proto/log.h"
#include "proto/text.h"

// Linux 5.14; older C libraries lack the names.
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace dsvm::node {
namespace {

constexpr uint32_t kHugePageSize = 2u << 20;
constexpr uint64_t kMaxRetainRunBytes = uint64_t{16} << 20;

// After a readv/writev that moved `n` bytes from iovec *at on: moves *at
// past the iovecs done and trims the one partly done.
void Advance(std::vector<iovec>& iov, size_t* at, size_t n) {
  while (n > 0) {
    const size_t take = std::min(n, iov[*at].iov_len);
    iov[*at].iov_base = static_cast<uint8_t*>(iov[*at].iov_base) + take;
    iov[*at].iov_len -= take;
    n -= take;
    if (iov[*at].iov_len == 0) ++*at;
  }
}

std::string Errno(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// The kernel's page size: the unit of mincore and of the page cache.
uint64_t KernelPageSize() {
  static const uint64_t size = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return size;
}

// Whether every kernel page of a mincore vector is in the page cache.
bool AllResident(std::span<const unsigned char> vec) {
  return std::all_of(vec.begin(), vec.end(), [](unsigned char v) { return (v & 1) != 0; });
}

bool ValidPageSize(uint32_t page_size) {
  return page_size == 4096 || page_size == (64u << 10) || page_size == kHugePageSize;
}

// A memfd of `size` bytes mapped shared into this process, or why not.
struct Backing {
  UniqueFd fd;
  uint8_t* map = nullptr;
};

Result<Backing> MakeBacking(const std::string& name, uint64_t size, unsigned int flags) {
  Backing b;
  b.fd.reset(memfd_create(name.c_str(), MFD_CLOEXEC | flags));
  if (!b.fd) return IoError(Errno("memfd_create"));
  if (ftruncate(b.fd.get(), static_cast<off_t>(size)) != 0) return IoError(Errno("ftruncate"));
  // For hugetlb, a shared mapping reserves the huge pages now, so a shortage
  // shows here rather than as SIGBUS at a later fault.
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, b.fd.get(), 0);
  if (p == MAP_FAILED) return IoError(Errno("mmap"));
  b.map = static_cast<uint8_t*>(p);
  // Children the daemon forks (tests, helpers) must not share its view.
  madvise(p, size, MADV_DONTFORK);
  return b;
}

}  // namespace

Result<std::unique_ptr<PageStore>> PageStore::Create(PageAddr base, uint64_t size,
                                                     uint32_t page_size, PageStoreOptions options) {
  if (!ValidPageSize(page_size)) {
    return InvalidArgument("page size " + std::to_string(page_size) +
                           " is not 4096, 65536 or 2097152");
  }
  if (size == 0 || size % page_size != 0) {
    return InvalidArgument("region size " + std::to_string(size) +
                           " is not a positive multiple of the page size " +
                           std::to_string(page_size));
  }
  if (base == 0 || base % page_size != 0) {
    return InvalidArgument("region base " + Hex(base) +
                           " is zero or not aligned to the page size " + std::to_string(page_size));
  }
  if (base + size < base) return InvalidArgument("region " + Hex(base) + " + size overflows");
  if (options.max_stashes == 0) return InvalidArgument("max_stashes must be positive");
  // A page is at least one of the kernel's (mincore and punches count in them).
  if (page_size % KernelPageSize() != 0) {
    return InvalidArgument("page size " + std::to_string(page_size) +
                           " is not a multiple of this kernel's page size " +
                           std::to_string(KernelPageSize()));
  }

  bool hugetlb = false;
  Result<Backing> backing = IoError("not tried");
  if (page_size == kHugePageSize && options.try_hugetlb) {
    backing = MakeBacking(options.name, size, MFD_HUGETLB | MFD_HUGE_2MB);
    hugetlb = backing.ok();
    if (!hugetlb) {
      LogInfo("page store " + Hex(base) + ": no hugetlb pages for 2 MiB pages (" +
              backing.status().message() +
              "); using a plain memfd, each page is 512 page-cache pages of 4 KiB");
    }
  }
  if (!hugetlb) backing = MakeBacking(options.name, size, 0);
  if (!backing.ok()) return backing.status();
  Backing b = std::move(backing).value();
  return std::unique_ptr<PageStore>(
      new PageStore(base, size, page_size, std::move(options), std::move(b.fd), b.map, hugetlb));
}

PageStore::PageStore(PageAddr base, uint64_t size, uint32_t page_size, PageStoreOptions options,
                     UniqueFd fd, uint8_t* map, bool hugetlb)
    : base_(base),
      size_(size),
      page_size_(page_size),
      options_(std::move(options)),
      fd_(std::move(fd)),
      map_(map),
      hugetlb_(hugetlb),
      views_(fd_.get(), page_size) {
  if (!hugetlb_ && options_.map_for_copies) {
    mapped_.reset(new std::atomic<uint8_t>[size_ / page_size_]());
  }
}

PageStore::~PageStore() {
  views_.Close();
  munmap(map_, size_);
}

Status PageStore::CheckPage(PageAddr page) const {
  if (page < base_ || page - base_ >= size_) {
    return InvalidArgument("page " + Hex(page) + " is outside region [" + Hex(base_) + ", " +
                           Hex(base_ + size_) + ")");
  }
  if ((page - base_) % page_size_ != 0) {
    return InvalidArgument("page " + Hex(page) + " is not aligned to the region's page size " +
                           std::to_string(page_size_));
  }
  return Status::Ok();
}

Status PageStore::CheckSpan(PageAddr page, size_t bytes) const {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  if (bytes != page_size_) {
    return InvalidArgument("buffer of " + std::to_string(bytes) + " bytes for a page of " +
                           std::to_string(page_size_));
  }
  return Status::Ok();
}

Status PageStore::ReadPage(PageAddr page, std::span<uint8_t> out) const {
  DSVM_RETURN_IF_ERROR(CheckSpan(page, out.size()));
  if (auto it = retained_.find(page); it != retained_.end()) {
    std::memcpy(out.data(), it->second.get(), page_size_);
    return Status::Ok();
  }
  if (IsMapped(page)) {  // all of it is in the memfd
    std::memcpy(out.data(), MapOf(page), page_size_);
    return Status::Ok();
  }
  // pread, not the mapping: reading a hole through a shared mapping would
  // allocate a page and so make the hole present.
  size_t done = 0;
  while (done < out.size()) {
    ssize_t n = pread(fd_.get(), out.data() + done, out.size() - done,
                      static_cast<off_t>(OffsetOf(page) + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return IoError(Errno("pread of the region memfd"));
    if (n == 0) return IoError("pread of the region memfd: unexpected end of file");
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status PageStore::Fill(PageAddr page, const uint8_t* data) {
  // A page a transfer still holds gets its new bytes in a fresh page: a
  // NIC may have the old one pinned (page_views.h).
  if (views_.Detach(OffsetOf(page), page_size_)) DSVM_RETURN_IF_ERROR(Punch(page));
  if (hugetlb_ || IsMapped(page)) {  // hugetlbfs has no write(2)
    if (data != nullptr) {
      std::memcpy(MapOf(page), data, page_size_);
    } else {
      std::memset(MapOf(page), 0, page_size_);
    }
    return Status::Ok();
  }
  // pwrite rather than the mapping, for a page not mapped here already:
  // the daemon takes no page fault of its own per install (a third of a
  // local install's cost on these machines), and a later punch has no PTE
  // of the daemon's to shoot down (pages the GPU tier copied have them).
  static const uint8_t kZeros[64 << 10] = {};
  size_t done = 0;
  while (done < page_size_) {
    const uint8_t* src = data != nullptr ? data + done : kZeros;
    const size_t len =
        data != nullptr ? page_size_ - done : std::min<size_t>(sizeof(kZeros), page_size_ - done);
    ssize_t n = pwrite(fd_.get(), src, len, static_cast<off_t>(OffsetOf(page) + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return IoError(Errno("pwrite to the region memfd"));
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status PageStore::WritePage(PageAddr page, std::span<const uint8_t> in) {
  DSVM_RETURN_IF_ERROR(CheckSpan(page, in.size()));
  retained_.erase(page);
  return Fill(page, in.data());
}

Status PageStore::WriteUnretained(PageAddr page, std::span<const uint8_t> in) {
  DSVM_RETURN_IF_ERROR(CheckSpan(page, in.size()));
  DSVM_CHECK(!IsRetained(page));
  if (mapped_ != nullptr) MapForCopies(page, /*allocate=*/true);
  return Fill(page, in.data());  // through the mapping once mapped
}

Status PageStore::ReadForCopy(PageAddr page, std::span<uint8_t> out) {
  DSVM_RETURN_IF_ERROR(CheckSpan(page, out.size()));
  if (mapped_ != nullptr && !IsRetained(page)) MapForCopies(page, /*allocate=*/false);
  return ReadPage(page, out);  // through the mapping once mapped
}

void PageStore::SetMapped(PageAddr first, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i) {
    mapped_[IndexOf(first) + i].store(1, std::memory_order_relaxed);
  }
}

void PageStore::ClearMapped(PageAddr first, uint64_t bytes) {
  if (mapped_ == nullptr) return;
  for (uint64_t i = 0; i < bytes / page_size_; ++i) {
    mapped_[IndexOf(first) + i].store(0, std::memory_order_relaxed);
  }
}

std::pair<PageAddr, uint64_t> PageStore::BlockOf(PageAddr page) const {
  const uint64_t block_bytes = std::max<uint64_t>(page_size_, kHugePageSize);
  const PageAddr block = base_ + (page - base_) / block_bytes * block_bytes;
  return {block, std::min<uint64_t>(block_bytes, base_ + size_ - block)};
}

std::optional<PageStore::Block> PageStore::MapBlock(PageAddr page) {
  if (!options_.map_for_copies || IsRetained(page)) return std::nullopt;
  // A page being received in place is in the memfd too, but is punched
  // again when its transfer is dropped, and not through PunchBytes (which
  // the mapped flags hear of): no block with a view.
  // A view may also have been dropped so since the block was mapped here:
  // the memfd itself must say every page is there.
  const auto [first, bytes] = BlockOf(page);
  for (uint64_t i = 0; views_.count() != 0 && i < bytes / page_size_; ++i) {
    if (HasView(first + i * page_size_)) return std::nullopt;
  }
  Result<std::vector<unsigned char>> resident = Residency(first, bytes);
  if (!resident.ok() || !AllResident(*resident)) return std::nullopt;
  // A hugetlb block is one page, and mincore reports this mapping's page
  // table for it (Residency): present means in the memfd and mapped here.
  if (hugetlb_) {
    DSVM_CHECK(bytes == page_size_);
    return Block{MapOf(first), first, bytes};
  }
  // All of it is in the memfd: mapping a page not mapped here yet maps the
  // whole block (MapForCopies).
  for (uint64_t i = 0; i < bytes / page_size_; ++i) {
    const PageAddr p = first + i * page_size_;
    if (!IsMapped(p) && (!MapForCopies(p, /*allocate=*/false) || !IsMapped(p))) {
      return std::nullopt;
    }
  }
  return Block{MapOf(first), first, bytes};
}

bool PageStore::MapForCopies(PageAddr page, bool allocate) {
  if (IsMapped(page)) return true;
  if (populate_refused_.load(std::memory_order_relaxed)) return false;
  // Whole 2 MiB blocks where they are all in the memfd: one call maps 512
  // pages of 4 KiB instead of one each.
  const auto [block, block_len] = BlockOf(page);
  Result<std::vector<unsigned char>> resident = Residency(block, block_len);
  if (!resident.ok()) return false;
  const std::span<const unsigned char> vec(*resident);
  PageAddr first = page;
  uint64_t len = page_size_;
  if (AllResident(vec)) {
    first = block;
    len = block_len;
  } else if (!allocate && !AllResident(vec.subspan((page - block) / KernelPageSize(),
                                                   page_size_ / KernelPageSize()))) {
    return false;  // a hole: reads of it go through pread
  }
  // Faults the range in writable now (allocating holes, with `allocate`);
  // kernels before 5.14 refuse, and copies take pread and pwrite then.
  if (madvise(MapOf(first), len, MADV_POPULATE_WRITE) != 0) {
    if (errno == EINVAL) populate_refused_.store(true, std::memory_order_relaxed);
    return false;
  }
  SetMapped(first, len / page_size_);
  return true;
}

Status PageStore::WritePages(PageAddr first, std::span<const std::span<const uint8_t>> pages) {
  for (size_t i = 0; i < pages.size(); ++i) {
    DSVM_RETURN_IF_ERROR(CheckSpan(first + i * page_size_, pages[i].size()));
  }
  for (size_t i = 0; i < pages.size(); ++i) retained_.erase(first + i * page_size_);
  if (views_.Detach(OffsetOf(first), pages.size() * page_size_)) {  // as in Fill
    DSVM_RETURN_IF_ERROR(PunchBytes(first, pages.size() * page_size_));
  }
  if (hugetlb_) {
    for (size_t i = 0; i < pages.size(); ++i) {
      DSVM_RETURN_IF_ERROR(Fill(first + i * page_size_, pages[i].data()));
    }
    return Status::Ok();
  }
  std::vector<iovec> iov(pages.size());
  for (size_t i = 0; i < pages.size(); ++i) {
    iov[i] = {const_cast<uint8_t*>(pages[i].data()), pages[i].size()};
  }
  size_t at = 0;  // the first iovec not yet written in full
  off_t offset = static_cast<off_t>(OffsetOf(first));
  while (at < iov.size()) {
    const int n_iov = static_cast<int>(std::min<size_t>(iov.size() - at, IOV_MAX));
    ssize_t n = pwritev(fd_.get(), iov.data() + at, n_iov, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return IoError(Errno("pwritev to the region memfd"));
    offset += n;
    Advance(iov, &at, static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status PageStore::ZeroPage(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  retained_.erase(page);
  return Fill(page, nullptr);
}

std::span<uint8_t> PageStore::MappedPage(PageAddr page) {
  DSVM_CHECK(CheckPage(page).ok());
  DSVM_CHECK(!IsRetained(page));
  views_.Detach(OffsetOf(page), page_size_);  // the caller may write
  return {MapOf(page), page_size_};
}

Result<std::shared_ptr<const uint8_t>> PageStore::LendForSend(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  if (IsRetained(page)) return FailedPrecondition("page " + Hex(page) + " is retained");
  // A view of a hole would allocate it.
  DSVM_ASSIGN_OR_RETURN(const bool present, IsPresent(page));
  if (!present) return FailedPrecondition("page " + Hex(page) + " is not all in the memfd");
  if (on_unpin_) on_unpin_(page, page_size_);
  return views_.MapForSend(OffsetOf(page));
}

Result<std::shared_ptr<uint8_t>> PageStore::ReceiveInPlace(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  if (IsRetained(page)) return FailedPrecondition("page " + Hex(page) + " is retained");
  DSVM_ASSIGN_OR_RETURN(const std::vector<unsigned char> vec, Residency(page, page_size_));
  if (std::any_of(vec.begin(), vec.end(), [](unsigned char v) { return (v & 1) != 0; })) {
    return FailedPrecondition("page " + Hex(page) + " is not a hole");
  }
  if (on_unpin_) on_unpin_(page, page_size_);
  return views_.MapForReceive(OffsetOf(page));
}

bool PageStore::Adopt(PageAddr page, const uint8_t* bytes) {
  if (!CheckPage(page).ok() || !views_.Adopt(OffsetOf(page), bytes)) return false;
  retained_.erase(page);  // as WritePage (ReceiveInPlace found none)
  // mincore of a hugetlb mapping reports this process's page table, not the
  // memfd: map the page here too, as an install through the mapping would,
  // so that IsPresent (and LendForSend) see it.
  if (hugetlb_ && madvise(MapOf(page), page_size_, MADV_POPULATE_READ) != 0) {
    (void)*reinterpret_cast<volatile const uint8_t*>(MapOf(page));  // before Linux 5.14
  }
  return true;
}

Status PageStore::PunchBytes(PageAddr first, uint64_t bytes) {
  // Cleared first: after a failed punch part of the range may be holes.
  if (on_unpin_) on_unpin_(first, bytes);
  ClearMapped(first, bytes);
  views_.Detach(OffsetOf(first), bytes);
  if (fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                static_cast<off_t>(OffsetOf(first)), static_cast<off_t>(bytes)) != 0) {
    return IoError(Errno("fallocate(PUNCH_HOLE) of the region memfd"));
  }
  return Status::Ok();
}

Status PageStore::Discard(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  retained_.erase(page);
  return Punch(page);
}

Status PageStore::DiscardAll() {
  retained_.clear();
  stashes_.clear();
  if (on_unpin_) on_unpin_(base_, size_);
  ClearMapped(base_, size_);
  views_.Detach(0, size_);
  if (fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                static_cast<off_t>(size_)) != 0) {
    return IoError(Errno("fallocate(PUNCH_HOLE) of the whole region memfd"));
  }
  return Status::Ok();
}

Result<bool> PageStore::IsPresent(PageAddr page) const {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  DSVM_ASSIGN_OR_RETURN(const std::vector<unsigned char> vec, Residency(page, page_size_));
  return AllResident(vec);
}

Result<std::vector<unsigned char>> PageStore::Residency(PageAddr first, uint64_t bytes) const {
  // For a shared file mapping mincore reports the page cache, whether or not
  // this process has the pages mapped; it allocates nothing. (For hugetlb it
  // reports this process's page table instead: Fill and Adopt map every
  // page they make present.)
  std::vector<unsigned char> vec(bytes / KernelPageSize());
  if (mincore(MapOf(first), bytes, vec.data()) != 0) return IoError(Errno("mincore"));
  return vec;
}

Status PageStore::CheckStashRoom() const {
  if (stashes_.size() >= options_.max_stashes) {
    return ResourceExhausted("page store " + Hex(base_) + ": " +
                             std::to_string(stashes_.size()) + " stashed pages, the bound");
  }
  return Status::Ok();
}

Result<PageStore::Bytes> PageStore::TakeBytes(PageAddr page) {
  if (auto it = retained_.find(page); it != retained_.end()) {
    Bytes b = std::move(it->second);
    retained_.erase(it);
    return b;
  }
  Bytes b(new uint8_t[page_size_]);
  DSVM_RETURN_IF_ERROR(ReadPage(page, {b.get(), page_size_}));
  DSVM_RETURN_IF_ERROR(Punch(page));
  return b;
}

Status PageStore::Stash(PageAddr page, TxnId txn) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  if (HasStash(page, txn)) {
    return AlreadyExists("page " + Hex(page) + " already has stash " + std::to_string(txn));
  }
  if (!IsRetained(page)) DSVM_RETURN_IF_ERROR(CheckStashRoom());
  DSVM_ASSIGN_OR_RETURN(Bytes b, TakeBytes(page));
  stashes_.emplace(std::make_pair(page, txn), std::move(b));
  return Status::Ok();
}

Status PageStore::ReadStash(PageAddr page, TxnId txn, std::span<uint8_t> out) const {
  DSVM_RETURN_IF_ERROR(CheckSpan(page, out.size()));
  auto it = stashes_.find({page, txn});
  if (it == stashes_.end()) {
    return NotFound("page " + Hex(page) + " has no stash " + std::to_string(txn));
  }
  std::memcpy(out.data(), it->second.get(), page_size_);
  return Status::Ok();
}

Status PageStore::InstallStash(PageAddr page, TxnId txn) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  auto it = stashes_.find({page, txn});
  if (it == stashes_.end()) {
    return NotFound("page " + Hex(page) + " has no stash " + std::to_string(txn));
  }
  retained_.erase(page);
  DSVM_RETURN_IF_ERROR(Fill(page, it->second.get()));
  stashes_.erase(it);
  return Status::Ok();
}

Status PageStore::DropStash(PageAddr page, TxnId txn) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  if (stashes_.erase({page, txn}) == 0) {
    return NotFound("page " + Hex(page) + " has no stash " + std::to_string(txn));
  }
  return Status::Ok();
}

Status PageStore::Retain(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  if (IsRetained(page)) return Status::Ok();
  DSVM_ASSIGN_OR_RETURN(Bytes b, TakeBytes(page));
  retained_.emplace(page, std::move(b));
  return Status::Ok();
}

Status PageStore::RetainRange(PageAddr first, size_t count) {
  if (count == 0) return Status::Ok();
  DSVM_RETURN_IF_ERROR(CheckPage(first));
  DSVM_RETURN_IF_ERROR(CheckPage(first + (count - 1) * page_size_));
  for (size_t i = 0; i < count;) {
    if (IsRetained(first + i * page_size_)) {
      ++i;
      continue;
    }
    // A run of pages not retained: read into buffers of their own, then
    // punched at once.
    std::vector<Bytes> bytes;
    std::vector<iovec> iov;
    size_t j = i;
    // At most kMaxRetainRunBytes at a time: the bytes are allocated before
    // the punch frees the memfd's.
    for (; j < count && j - i < IOV_MAX && (j - i) * page_size_ < kMaxRetainRunBytes &&
           !IsRetained(first + j * page_size_);
         ++j) {
      bytes.emplace_back(new uint8_t[page_size_]);
      iov.push_back({bytes.back().get(), page_size_});
    }
    const PageAddr run = first + i * page_size_;
    off_t offset = static_cast<off_t>(OffsetOf(run));
    for (size_t at = 0; at < iov.size();) {
      // preadv, not the mapping: a hole reads as zeros and stays a hole.
      ssize_t n = preadv(fd_.get(), iov.data() + at, static_cast<int>(iov.size() - at), offset);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return IoError(Errno("preadv of the region memfd"));
      if (n == 0) return IoError("preadv of the region memfd: unexpected end of file");
      offset += n;
      Advance(iov, &at, static_cast<size_t>(n));
    }
    DSVM_RETURN_IF_ERROR(PunchBytes(run, (j - i) * page_size_));
    for (size_t k = i; k < j; ++k) retained_.emplace(first + k * page_size_, std::move(bytes[k - i]));
    i = j;
  }
  return Status::Ok();
}

Result<uint64_t> PageStore::ResidentBytes() const {
  struct stat st{};
  if (::fstat(fd_.get(), &st) != 0) return IoError(Errno("fstat of the region memfd"));
  return static_cast<uint64_t>(st.st_blocks) * 512;  // st_blocks counts 512-byte units
}

Status PageStore::Restore(PageAddr page) {
  DSVM_RETURN_IF_ERROR(CheckPage(page));
  auto it = retained_.find(page);
  if (it == retained_.end()) return Status::Ok();
  DSVM_RETURN_IF_ERROR(Fill(page, it->second.get()));
  retained_.erase(it);
  return Status::Ok();
}

}  // namespace dsvm::node
