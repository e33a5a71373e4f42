/* libdsvm: the C API of dsvm, distributed shared virtual memory.
 *
 * A process connects to its node's daemon (dsvm-node) with dsvm_init, then
 * creates or opens named regions. A region lies at the same virtual address
 * in every process on every node, so a pointer into it means the same bytes
 * everywhere; the node daemons keep its pages coherent (PROTOCOL.md).
 *
 *   void* p;
 *   if (dsvm_init(NULL) != 0) { ...dsvm_last_error()... }
 *   dsvm_region_create("grid", 1 << 30, 0, &p);   // or dsvm_region_open
 *   ...use p...
 *   dsvm_region_close(p);
 *   dsvm_finalize();
 *
 * Errors: every function returns 0 (DSVM_OK) or a negative DSVM_E* code
 * (dsvm_barrier_wait may also return DSVM_BARRIER_LAST), and
 * leaves a sentence saying why in dsvm_last_error(). Arguments are validated;
 * a bad one is refused with DSVM_EINVALID_ARGUMENT and changes nothing.
 *
 * Threads: every function may be called from any thread. Calls that talk to
 * the daemon (init, finalize, region create / open / close / destroy) are
 * serialised: one request is in flight per process at a time. Using a
 * region's memory needs no call and takes no lock.
 *
 * The daemon's death: the daemon serves a region's page faults, so without
 * it the memory would no longer be coherent. When the connection to the
 * daemon breaks (it exited, or stopped answering for 60 s), every open region
 * is made inaccessible at once (an access gets SIGSEGV) but stays reserved,
 * calls that need the daemon fail with DSVM_EUNAVAILABLE, and
 * dsvm_region_close and dsvm_finalize still release what this process holds.
 * dsvm_finalize then dsvm_init connects again.
 *
 * fork(): a child inherits no region (they are mapped MADV_DONTFORK) and no
 * connection; it calls dsvm_init to use dsvm itself. fork() waits for a
 * call another thread has in progress.
 *
 */
#ifndef DSVM_DSVM_H_
#define DSVM_DSVM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes. -1 .. -31 mirror dsvm's StatusCode (proto/status.h) as they
 * arrive from the daemon or the coordinator; lower values are the library's
 * own. The values are ABI: never renumber. */
enum dsvm_error {
  DSVM_OK = 0,
  DSVM_EINVALID_ARGUMENT = -1,     /* a bad argument; nothing was done */
  DSVM_ENOT_FOUND = -2,            /* no region of that name */
  DSVM_EALREADY_EXISTS = -3,       /* a region of that name exists */
  DSVM_EPERMISSION_DENIED = -4,    /* credentials refused, or userfaultfd not allowed */
  DSVM_EUNAVAILABLE = -5,          /* no daemon, or it (or its coordinator) is unreachable */
  DSVM_EDATA_LOSS = -6,            /* data was lost with a node that died */
  DSVM_ECORRUPTION = -7,           /* stored or received bytes failed validation */
  DSVM_EIO = -8,                   /* the operating system refused an operation */
  DSVM_ERESOURCE_EXHAUSTED = -9,   /* a limit was reached: memory, address space, window */
  DSVM_EFAILED_PRECONDITION = -10, /* a valid request in the wrong state */
  DSVM_EINTERNAL = -11,            /* a bug, here or in the daemon; see dsvm_last_error() */
  DSVM_ENOT_INITIALIZED = -32,     /* dsvm_init has not succeeded in this process */
  DSVM_EBUSY = -33                 /* dsvm_lock_try_acquire: another thread holds the lock */
};

/* Page sizes a region may have. */
#define DSVM_PAGE_SIZE_4K ((size_t)4096)
#define DSVM_PAGE_SIZE_64K ((size_t)65536)
#define DSVM_PAGE_SIZE_2M ((size_t)2097152)

/* A region name is 1..DSVM_MAX_NAME_LENGTH characters of [A-Za-z0-9._-]
 * and does not start with '.'. */
#define DSVM_MAX_NAME_LENGTH 255

/* The socket dsvm_init uses when given NULL and $DSVM_SOCKET is unset. */
#define DSVM_DEFAULT_SOCKET "/run/dsvm/node.sock"

/* Connects this process to its node's daemon. socket_path: the daemon's
 * UNIX socket; NULL means $DSVM_SOCKET, or DSVM_DEFAULT_SOCKET when that is
 * unset or empty.
 * Errors: DSVM_EINVALID_ARGUMENT (empty path, or longer than a UNIX socket
 * path may be), DSVM_EFAILED_PRECONDITION (already initialised, or
 * the daemon does not speak this library's ABI),
 * DSVM_EUNAVAILABLE (no daemon listens there, or it stopped answering),
 * DSVM_EPERMISSION_DENIED (the socket or the daemon refused this process),
 * DSVM_EINTERNAL (the daemon broke the protocol), DSVM_EIO. */
int dsvm_init(const char* socket_path);

/* Closes every region still open (as dsvm_region_close), then the
 * connection. Releases everything even when the daemon is gone.
 * Errors: DSVM_ENOT_INITIALIZED. */
int dsvm_finalize(void);

/* Who may use a region: a region records its creator's uid and gid (as the
 * node daemon sees them, SO_PEERCRED) and permission bits, as a file does.
 * Opening needs both read and write bits for the caller's class (owner,
 * group by primary gid, others); root opens any region. A region may also
 * have a token, a secret string: whoever presents it may open the region
 * (dsvm_region_open_token). Only the owner and root may destroy a region.
 * dsvm_region_create gives mode 0600 and no token: the creator's user only. */

/* Creates region `name` of `size` bytes (rounded up to whole pages) with
 * pages of `page_size` bytes (0 means 4096; else 4096, 65536 or 2097152) and
 * maps it: *addr receives its address, the same on every node. Its memory
 * reads as zeros until written. When mapping fails the region is deleted
 * again. Only the creator's user may open it (mode 0600, no token).
 * Errors: DSVM_EINVALID_ARGUMENT (name, size 0, page size, addr NULL),
 * DSVM_EALREADY_EXISTS, DSVM_ERESOURCE_EXHAUSTED (larger than the cluster's
 * address window, no room left in it, or something else is mapped at the
 * region's address in this process), DSVM_EPERMISSION_DENIED (this process
 * may not create a userfaultfd: run as root or set
 * vm.unprivileged_userfaultfd=1), DSVM_ENOT_INITIALIZED, DSVM_EUNAVAILABLE,
 * DSVM_EINTERNAL, DSVM_EIO. */
int dsvm_region_create(const char* name, size_t size, size_t page_size, void** addr);

typedef struct dsvm_region_attr {
  size_t page_size;  /* 0 means 4096; else 4096, 65536 or 2097152 */
  unsigned mode;     /* permission bits (0600, 0660, 0666...); 0 means 0600 */
  const char* token; /* NULL, or 1..255 bytes whose holders may open it */
} dsvm_region_attr_t;

/* As dsvm_region_create, with who may open the region. Zero-initialise attr
 * and set what you need.
 * Errors: as dsvm_region_create; DSVM_EINVALID_ARGUMENT also for attr NULL,
 * mode above 0777 or an empty or too long token. */
int dsvm_region_create_attr(const char* name, size_t size, const dsvm_region_attr_t* attr,
                            void** addr);

/* Maps the existing region `name`: *addr receives its address and *size its
 * size in bytes (a whole number of its pages). size may be NULL.
 * Errors: DSVM_EINVALID_ARGUMENT (name, addr NULL), DSVM_ENOT_FOUND,
 * DSVM_EFAILED_PRECONDITION (this process has it open already),
 * DSVM_ERESOURCE_EXHAUSTED (something else is mapped at its address in this
 * process), DSVM_EPERMISSION_DENIED, DSVM_ENOT_INITIALIZED,
 * DSVM_EUNAVAILABLE, DSVM_EINTERNAL, DSVM_EIO. */
int dsvm_region_open(const char* name, void** addr, size_t* size);

/* As dsvm_region_open, presenting the region's token (1..255 bytes).
 * Errors: as dsvm_region_open; DSVM_EPERMISSION_DENIED when neither the
 * caller's credentials nor the token allow it. */
int dsvm_region_open_token(const char* name, const char* token, void** addr, size_t* size);

/* Unmaps the region whose address is `addr` (as create or open returned
 * it); its memory must not be used afterwards. The region itself stays, for
 * dsvm_region_open or dsvm_region_destroy. Once addr is accepted the region
 * is released in this process whatever else happens; a later error only
 * says that the daemon could not be told or refused (it forgets a client's
 * mappings anyway when the connection closes). With the connection already
 * broken there is nobody to tell, and close succeeds.
 * Errors: DSVM_EINVALID_ARGUMENT (addr NULL, or not the address of a region
 * open in this process), DSVM_ENOT_INITIALIZED; after release: the daemon's
 * refusal, DSVM_EUNAVAILABLE, DSVM_EINTERNAL. */
int dsvm_region_close(void* addr);

/* Deletes region `name` in the whole cluster; its address range may then be
 * given to a new region. Close it in this process first. Other processes
 * that still have it open are not waited for: their next access to a page
 * not valid on their node fails with SIGBUS, and their node daemon logs that
 * the region was deleted.
 * Errors: DSVM_EINVALID_ARGUMENT (name), DSVM_ENOT_FOUND,
 * DSVM_EFAILED_PRECONDITION (open in this process), DSVM_EPERMISSION_DENIED
 * (not the owner or root), DSVM_ENOT_INITIALIZED, DSVM_EUNAVAILABLE,
 * DSVM_EINTERNAL. */
int dsvm_region_destroy(const char* name);

/* *id receives the id of the node this process is connected to (never 0).
 * Errors: DSVM_EINVALID_ARGUMENT (id NULL), DSVM_ENOT_INITIALIZED. */
int dsvm_node_id(uint32_t* id);

/* --- Locks and barriers ------------------------------------------------------
 *
 * A dsvm_lock_t or dsvm_barrier_t lives in region memory (put it in a region
 * and pass its address), so every thread on every node that maps the region
 * uses the same one. They order memory across nodes: what a thread wrote
 * before dsvm_lock_release is seen by any thread, on any node, after its
 * dsvm_lock_acquire of the same lock; what every party wrote before
 * dsvm_barrier_wait is seen by every party after it.
 *
 * How: dsvm keeps region memory sequentially consistent (one writer per
 * page, every other copy invalidated before a write; PROTOCOL.md), so a lock
 * is an atomic compare-and-swap on a word of region memory and a barrier a
 * counter with a generation. The names acquire / release leave room for a
 * relaxed-consistency mode in which they would also make writes visible.
 *
 * Waiting: a waiter rereads the word. While nobody writes it, its node holds
 * a read-only copy and a reread costs no network trip; the holder's write
 * invalidates that copy and the next reread fetches the new value. The
 * waiter backs off from spinning to sleeps of up to 1 ms. Locks are not
 * fair: a node that releases and acquires again at once tends to win.
 *
 * Keep a lock away from the data it guards when several nodes write that
 * data: a page holds both only when they move together anyway.
 *
 * A lock is held by a thread (its node id and thread id are in the word).
 * When the holder exits, or its node dies, without releasing, the lock
 * stays held: as with a non-robust pthread mutex, there is no recovery.
 *
 * Errors common to all: DSVM_EINVALID_ARGUMENT (NULL, not 8-byte aligned,
 * or not inside a region open in this process), DSVM_ENOT_INITIALIZED.
 * Closing the region while another thread waits is a programmer error. */
typedef struct dsvm_lock {
  uint64_t word; /* 0: free; else the holder. Do not touch. */
} dsvm_lock_t;

typedef struct dsvm_barrier {
  uint64_t word;    /* generation << 32 | parties arrived. Do not touch. */
  uint64_t parties; /* set by dsvm_barrier_init */
} dsvm_barrier_t;

/* dsvm_barrier_wait returns it to exactly one party per round (the last to
 * arrive), DSVM_OK to the others. */
#define DSVM_BARRIER_LAST 1

/* Makes *lock free. Call it once, before any thread uses the lock (fresh
 * region memory is zero, which is a free lock too). */
int dsvm_lock_init(dsvm_lock_t* lock);

/* Waits until the calling thread holds *lock.
 * Errors: DSVM_EFAILED_PRECONDITION (the calling thread holds it already). */
int dsvm_lock_acquire(dsvm_lock_t* lock);

/* Takes *lock if it is free, without waiting.
 * Errors: DSVM_EBUSY (another thread holds it), DSVM_EFAILED_PRECONDITION
 * (the calling thread holds it already). */
int dsvm_lock_try_acquire(dsvm_lock_t* lock);

/* Releases *lock, held by the calling thread.
 * Errors: DSVM_EFAILED_PRECONDITION (the calling thread does not hold it). */
int dsvm_lock_release(dsvm_lock_t* lock);

/* Prepares *barrier for `parties` parties (1 .. 2^31). Call it once, before
 * any party waits, and not while one does.
 * Errors: DSVM_EINVALID_ARGUMENT also for parties out of range. */
int dsvm_barrier_init(dsvm_barrier_t* barrier, uint32_t parties);

/* Waits until `parties` calls have arrived in this round, then returns in
 * all of them; the barrier is then ready for the next round.
 * Returns DSVM_BARRIER_LAST in one party, DSVM_OK in the others.
 * Errors: DSVM_EFAILED_PRECONDITION (not initialised, or its word is
 * corrupt: more arrivals than parties). */
int dsvm_barrier_wait(dsvm_barrier_t* barrier);

/* --- Prefetch and advice ----------------------------------------------------
 *
 * Both take a range of a region open in this process; it is widened to
 * whole pages. */

/* dsvm_prefetch flags. */
#define DSVM_PREFETCH_WRITE 1u /* take the pages Modified (for writing); else Shared */

/* Makes every page of [addr, addr + len) valid on this node, as faults on
 * them would, and returns when all are: later accesses by any process of the
 * node cost no network trip (until another node writes them). The daemon
 * keeps up to 256 pages (and 16 MiB) in flight at once, so this is much
 * faster than faulting the pages one by one. It holds the process's one request slot
 * for its duration (see Threads above).
 * Errors: DSVM_EINVALID_ARGUMENT (NULL, len 0, not inside one region open in
 * this process, unknown flags), DSVM_EDATA_LOSS (a page was lost with a
 * node that died), DSVM_ENOT_INITIALIZED, DSVM_EUNAVAILABLE. */
int dsvm_prefetch(const void* addr, size_t len, unsigned flags);

/* Without any advice, read faults of a node that run in order through a
 * region (each miss on the page after the last, or inside the pages read
 * ahead) make the daemon read ahead: 64 KiB after the first two, then twice
 * as much after each further miss in order, up to 256 pages (or 16 MiB of
 * large pages); a miss out of order stops it. Pages read ahead are fetched
 * Shared and counted in prefetched_pages.
 *
 * Advice for dsvm_advise. The values are ABI. */
enum dsvm_advice {
  DSVM_ADVICE_NORMAL = 1,      /* no advice: each fault fetches its own page
                                  (and sequential faults read ahead, above);
                                  also ends a preferred node */
  DSVM_ADVICE_READ_MOSTLY = 2, /* a read fault also fetches the next 16 pages of
                                  the range in the background (read-ahead). Reads
                                  always replicate pages (MSI); this is for data
                                  read in sequence and rarely written. On the
                                  node's GPUs: a read dsvm_gpu_map of such pages
                                  that have a copy on another GPU of the node
                                  gets a copy of its own for the map's life (two
                                  GPUs may map them at once) instead of moving
                                  them. */
  DSVM_ADVICE_PREFERRED_NODE = 3, /* `node` (a node id, as dsvm_stats and dsvmctl
                                  nodes show) keeps the pages this node gives up
                                  for lack of room (past dsvm-node --host-budget:
                                  remote swap): their last copy goes there, not to
                                  a node the directory picks, while that node is a
                                  live member (else the directory picks). Accesses
                                  elsewhere still move copies as usual. Kept with
                                  read-mostly advice, ended by normal advice. */
  DSVM_ADVICE_PREFERRED_GPU = 4, /* `node` names a GPU of this node (0, 1, ...):
                                  the pages this node holds Shared get a clean
                                  copy in that GPU's memory, now and whenever a
                                  read brings one here later, as
                                  dsvm_gpu_prefetch would place them (unpinned:
                                  the GPU budget may evict them). A later
                                  dsvm_gpu_map of them copies nothing. Pages
                                  held Modified now are placed too (and leave
                                  local page tables as after dsvm_gpu_prefetch);
                                  pages a local write brings later are not.
                                  Placement is best effort: what the budget
                                  cannot hold beside pinned pages is left on the
                                  host. Needs a daemon with a GPU tier. Kept with
                                  the other advice, ended by normal advice. */
  DSVM_ADVICE_ACCESSED_BY = 5   /* `node` names a GPU of this node: dsvm_gpu_map
                                  of these pages on that GPU maps this node's
                                  host copy itself (zero-copy): nothing is
                                  copied to or kept in its memory, and the GPU
                                  reads and writes host memory over the bus,
                                  where this node's processes see its writes
                                  at once. Ownership is taken and held as for
                                  any map. For data a GPU touches sparsely or
                                  once, where moving pages costs more than
                                  reading them across the bus. A map's pages
                                  must all have the advice or none. With a
                                  cuda daemon libdsvm registers the range with
                                  CUDA for the map's life (mapped pinned
                                  memory); with an emulated one the device
                                  pointer is the address itself. Needs a
                                  daemon with a GPU tier; ended by normal
                                  advice. */
};

/* Gives `advice` for the pages of [addr, addr + len). Advice is kept by this
 * node's daemon and applies to every process of this node (not to other
 * nodes) until changed or until the daemon restarts. `node` is for advice
 * that names a node (DSVM_ADVICE_PREFERRED_NODE) or a GPU
 * (DSVM_ADVICE_PREFERRED_GPU, DSVM_ADVICE_ACCESSED_BY); pass 0 with the
 * others.
 * Errors: DSVM_EINVALID_ARGUMENT (NULL, len 0, not inside one region open in
 * this process, unknown advice, a node with advice that takes none, none
 * with advice that needs one, no such GPU on this node),
 * DSVM_EFAILED_PRECONDITION (GPU advice to a daemon without a GPU tier),
 * DSVM_ENOT_INITIALIZED, DSVM_EUNAVAILABLE. */
int dsvm_advise(const void* addr, size_t len, int advice, uint32_t node);

/* --- GPU maps -----------------------------------------------------------------
 *
 * A node daemon started with a GPU tier (dsvm-node --device-backend
 * emulated|cuda --gpu-budget BYTES) keeps region pages in its GPUs' memory
 * on demand. dsvm_gpu_map makes a range of a region resident on one GPU of
 * this node and returns one device pointer to it: the range's pages lie
 * there contiguously, in address order, for a kernel to use.
 *
 * Ownership: a map takes every page of the range cluster-wide, Shared for
 * DSVM_GPU_READ, Modified for DSVM_GPU_WRITE (as dsvm_prefetch would), and
 * keeps it until dsvm_gpu_unmap: another node that wants a page of a read
 * map for writing, or any page of a write map, waits until it is unmapped.
 * A gpu map is like holding a lock on its pages. Hence the deadlock rule:
 * never wait, while holding a map, for something another process may do
 * only after it has mapped (or faulted on) pages you hold; map and unmap in
 * one place around each kernel, and when a process must hold several maps
 * at once, take them in address order everywhere. On this node, CPU writes
 * to a read-mapped page and any CPU access to a write-mapped page race with
 * the GPU: what the CPU then sees of the GPU's writes, or the GPU of the
 * CPU's, is undefined until the map ends.
 *
 * After dsvm_gpu_unmap, pages written by the GPU stay in its memory, dirty:
 * they are written back to host memory when another node asks for them,
 * when the GPU budget evicts them, or when a process of this node touches
 * them (they are taken from its page table while mapped for write and
 * after, so that touch faults and the daemon writes the GPU's bytes back
 * first); the next map of them costs no copy. A CPU access during a write
 * map sees the bytes of that moment, as with any concurrent write.
 *
 * A process's maps end when it calls dsvm_finalize, exits or dies.
 *
 * Device pointers: with a cuda daemon, a CUDA device pointer of `gpu` in
 * this process (opened with cudaIpcOpenMemHandle: this libdsvm must be built
 * with CUDA); with an emulated daemon, host memory that plays the device
 * memory (a shared mapping of the daemon's arena), which the process may
 * read and write directly. A device pointer is valid until the map ends. */

/* dsvm_gpu_map modes. WRITE includes READ. */
#define DSVM_GPU_READ 1u
#define DSVM_GPU_WRITE 2u

/* Makes [addr, addr + len) resident on GPU `gpu` of this node (see above)
 * and sets *device_ptr to the first byte of its device copy; page i of the
 * range is at *device_ptr + i * page size. addr and len must be multiples of
 * the region's page size, inside one region open in this process. Maps of
 * one process may repeat a range (each needs its unmap) but may not overlap
 * another map's range otherwise. The range must fit the GPU's budget beside
 * the pages other maps hold.
 * Errors: DSVM_EINVALID_ARGUMENT (NULL addr or device_ptr, len 0, not aligned
 * to the region's pages, not inside one region open in this process, gpu
 * negative or not a GPU of the node, unknown mode),
 * DSVM_EFAILED_PRECONDITION (the node's daemon has no GPU tier, or a page is
 * mapped already by an overlapping map), DSVM_ERESOURCE_EXHAUSTED (the
 * range does not fit the GPU's budget beside the pages mapped now),
 * DSVM_EDATA_LOSS (a page was lost with a node that died),
 * DSVM_EUNAVAILABLE (no daemon; other nodes kept taking the pages while the
 * map acquired them; or the device memory is CUDA and this libdsvm was built
 * without CUDA or cannot open it), DSVM_ENOT_INITIALIZED, DSVM_EIO. */
int dsvm_gpu_map(const void* addr, size_t len, int gpu, unsigned mode, void** device_ptr);

/* Ends this process's map of exactly [addr, addr + len) (as mapped); its
 * device pointer must not be used afterwards.
 * A map is lost when its node loses its pages while it is mapped (the node
 * was declared dead: cut off or stalled past its lease, its copies were
 * handed on or lost; or the region was destroyed and this process closed
 * it). Its device memory stays the process's until this call, so no other
 * page is placed there meanwhile, but what the GPU wrote through it never
 * reaches the region: the call then ends the map all the same and returns
 * DSVM_EDATA_LOSS. The region need not be open any more.
 * Errors: DSVM_EINVALID_ARGUMENT (NULL, len 0, or no map of this process
 * has exactly that range),
 * DSVM_EDATA_LOSS (the map was lost; it has ended), DSVM_ENOT_INITIALIZED,
 * DSVM_EUNAVAILABLE. */
int dsvm_gpu_unmap(const void* addr, size_t len);

/* Makes the pages of [addr, addr + len) (widened to whole pages) resident
 * on GPU `gpu` of this node, as dsvm_gpu_map would place them, without
 * mapping them: a later dsvm_gpu_map of the range finds them there and
 * copies nothing, unless the GPU budget evicted them meanwhile or a process
 * of this node wrote them. Takes the pages Shared, or Modified with
 * DSVM_PREFETCH_WRITE, cluster-wide (as dsvm_prefetch), and holds nothing
 * when it returns: other nodes may take the pages at once.
 * Errors: DSVM_EINVALID_ARGUMENT (NULL, len 0, not inside one region open
 * in this process, gpu negative or not a GPU of the node, unknown flags),
 * DSVM_EFAILED_PRECONDITION (the node's daemon has no GPU tier),
 * DSVM_ERESOURCE_EXHAUSTED (the range does not fit the GPU's budget beside
 * the pages mapped now), DSVM_EDATA_LOSS, DSVM_EUNAVAILABLE,
 * DSVM_ENOT_INITIALIZED. */
int dsvm_gpu_prefetch(const void* addr, size_t len, int gpu, unsigned flags);

/* --- Statistics -------------------------------------------------------------
 *
 * Counters of the node this process is connected to (all its processes
 * together), counted by its daemon since it started. `dsvmctl nodes` shows
 * the same counters for every node of the cluster. */
typedef struct dsvm_node_stats {
  uint32_t node;             /* the node's id */
  uint32_t clients;          /* processes connected to its daemon now */
  uint64_t read_faults;      /* reads of pages not valid on the node */
  uint64_t write_faults;     /* writes of pages the node did not own */
  uint64_t local_hits;       /* faults resolved on the node, no message */
  uint64_t pages_fetched;    /* pages received from other nodes */
  uint64_t pages_sent;       /* pages sent to other nodes */
  uint64_t bytes_fetched;
  uint64_t bytes_sent;
  uint64_t invalidations;    /* copies dropped because another node wrote */
  uint64_t downgrades;       /* pages made read-only because another node read */
  uint64_t prefetched_pages; /* pages dsvm_prefetch and read-ahead asked for */
  /* The GPU tier (0 with a daemon without one): */
  uint64_t gpu_maps;           /* dsvm_gpu_map calls that succeeded */
  uint64_t gpu_zero_copy_maps; /* of which maps of the host copy (accessed-by) */
  uint64_t gpu_maps_lost;      /* maps whose pages the node lost (DSVM_EDATA_LOSS) */
  uint64_t gpu_placed_pages;   /* pages placed by DSVM_ADVICE_PREFERRED_GPU */
  uint64_t gpu_pages_in;       /* pages copied to the node's GPUs */
  uint64_t gpu_pages_out;      /* dirty pages written back from them */
  /* Leases (proto/PROTOCOL.md, "Leases"): the node was cut off from its coordinator */
  uint64_t fences;             /* times it took its pages from its processes */
  uint64_t fenced_accesses;    /* accesses that waited for the coordinator */
  /* Direct reads (proto/PROTOCOL.md, "Direct reads"): */
  uint64_t direct_reads;         /* read faults answered by another node's copy sent at once */
  uint64_t direct_reads_served;  /* such copies this node sent */
  /* Of gpu_pages_in and gpu_pages_out, the pages copied straight between
   * the node's memory and a GPU, with no staging buffer (docs/GPU.md): */
  uint64_t gpu_direct_pages_in;
  uint64_t gpu_direct_pages_out;
} dsvm_node_stats_t;

/* Fills *stats with the local node's counters.
 * Errors: DSVM_EINVALID_ARGUMENT (stats NULL), DSVM_ENOT_INITIALIZED,
 * DSVM_EUNAVAILABLE. */
int dsvm_stats(dsvm_node_stats_t* stats);

/* A short description of an error code ("invalid argument"); never NULL,
 * also for an unknown code. Static storage. */
const char* dsvm_strerror(int err);

/* Why the calling thread's last dsvm_ call failed, one sentence; "" after a
 * call that succeeded. Every function but dsvm_strerror and dsvm_last_error
 * sets it. Valid until this thread's next dsvm_ call; never NULL. */
const char* dsvm_last_error(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSVM_DSVM_H_ */
