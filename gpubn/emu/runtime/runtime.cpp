// gpubn emu: the SIMT runtime.
//
// Runs one CUDA launch on the calling OS thread: every CUDA thread as its own
// fiber with a small stack, several blocks at a time (all of them for a
// cooperative launch), interleaved a round at a time.  Fibers switch only at
// barriers, warp collectives, exits and spin-waits, so a block's threads really
// meet at __syncthreads and exchange values at warp shuffles.
//
// The kernel translation unit is compiled with -fsanitize=thread (GCC's
// instrumentation only: the hooks are defined here), so the compiler calls
// __tsan_{read,write}N, or __tsan_volatile_{read,write}N for a volatile access,
// before every load and store it cannot prove local (and the linker sends
// memcpy/memset calls to the __wrap_ functions below).  Those callbacks, defined here (this
// file is compiled without instrumentation), classify the address:
//   - the calling thread's own stack             -> fine;
//   - an argument buffer (global memory)         -> counted as traffic;
//   - dynamic or static shared memory            -> racecheck and initcheck
//                                                   (per-byte shadow state);
//   - read-only data of the module (constants)   -> fine for loads;
//   - anything else                              -> memcheck error.
// An error never lets the access happen: the fiber switches back to the
// scheduler and the launch is abandoned.  Barriers that cannot complete and
// spin-waits that cannot end are reported as deadlocks.
#include <assert.h>
#include <errno.h>
#include <link.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <unordered_map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
#define EMU_HIDDEN __attribute__((visibility("hidden")))

namespace {

// ------------------------------------------------------------------ the launch record
// Shared with Python (ctypes); every field 8 bytes wide except the message.
struct Buffer {
    uint64_t lo, size;            // [lo, lo + size)
    uint64_t loaded, stored;      // bytes (out)
    int64_t arg_index;
};

enum ErrorKind : int64_t { OK = 0, MEMCHECK = 1, RACE = 2, DEADLOCK = 3, KERNEL = 4, CONFIG = 5 };
enum Region : int64_t { R_NONE = 0, R_DYNAMIC_SHARED = 2, R_STATIC_SHARED = 3, R_GLOBAL = 4 };

struct Launch {
    // in
    uint64_t thunk, args, buffers;
    int64_t nbuffers;
    int64_t grid[3], block[3];
    int64_t shared_mem, seed, shuffle, memcheck, racecheck, initcheck;
    int64_t resident;             // how many blocks run concurrently (interleaved)
    int64_t global_report;        // report inter-block races (else: model their stale loads)
    // out
    int64_t error, is_store, size, region;
    uint64_t address;
    int64_t block_idx[3], thread_idx[3];
    int64_t other_thread[3], other_is_store;
    int64_t buffer, offset;       // nearest argument buffer (-1: none) and offset from its start
    int64_t blocks_run;
    int64_t other_block[3];       // inter-block race: the block of the earlier access
    char message[4096];
};

constexpr size_t kStack = 64 * 1024;         // usable stack per CUDA thread
constexpr size_t kGuard = 4096;
constexpr size_t kDynCap = 232448;           // 227 KiB, the opt-in maximum on sm_90
constexpr int kMaxThreads = 1024;
constexpr size_t kStageGap = size_t(1) << 30;  // unmapped bytes around each staged argument buffer

enum State : int { RUN = 0, BAR = 1, WARP = 2, DONE = 3 };

#if defined(__x86_64__) && !defined(GPUBN_EMU_UCONTEXT)
#define GPUBN_EMU_ASM_SWITCH 1
#else
#define GPUBN_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

struct Fiber {
    void* sp;                           // saved stack pointer (or its ucontext)
#if !GPUBN_EMU_ASM_SWITCH
    ucontext_t uc;
#endif
    uintptr_t stack_lo;                 // [stack_lo, stack_lo + kStack)
    uint3 tid;
    int linear, warp, lane;
    int state;
    void* site;                         // barrier call site (named in deadlock reports)
    int op, arg, width;                 // warp collective
    unsigned mask;
    unsigned long long value, result;
    uintptr_t spin_addr;                // spin-wait detection: consecutive loads of one address
    uint32_t spin_count, spin_rounds;
    unsigned long long spin_value;
    uint64_t spin_progress;             // Runtime::progress at the last hand-over
    // inter-block ordering (see "inter-block racecheck")
    uint32_t fence_t, fence_bar;        // time of the last __threadfence, the block's last barrier before it
    uint32_t gaccess_t;                 // time of the last load or store of global memory (0: none)
    int pending, acquired;              // indices into Runtime::covs (-1: none)
    uint32_t seen_release, seen_version; // the release record last merged into `pending` (by a load)
};

// What a thread (or block) has synchronized with: the stores of block b before
// time bar[b] (published by a fence after a barrier of b), and the stores of the
// thread w (block * 1024 + thread) before time own[w] (published by its own fence).
struct Coverage {
    std::unordered_map<uint32_t, uint32_t> bar;
    std::unordered_map<uint64_t, uint32_t> own;
    void merge(const Coverage& o) {
        for (const auto& kv : o.bar) { uint32_t& v = bar[kv.first]; if (kv.second > v) v = kv.second; }
        for (const auto& kv : o.own) { uint32_t& v = own[kv.first]; if (kv.second > v) v = kv.second; }
    }
    uint32_t version = 0;               // (release records) bumped by every release into it
    uint32_t last_who = 0, last_t = 0;  // (release records) the location's last strong store: who, when
    bool covers(uint32_t block, uint64_t writer, uint32_t t) const {
        auto b = bar.find(block);
        if (b != bar.end() && t < b->second) return true;
        auto w = own.find(writer);
        return w != own.end() && t < w->second;
    }
};

// Per 2 bytes of an argument buffer (a group of overlapping ones): who stored
// them last in this launch, and the last two blocks' threads that loaded them
// since.  Kernels access global memory in units of at least 2 bytes, so two
// bytes of one granule are not stored by different blocks.
constexpr size_t kGranule = 2;
struct Access {
    uint32_t who;                       // 0: none; kAtomicByte (stores only): an atomic;
                                        // else (block linear index + 1) << 10 | thread
    uint32_t t;                         // time of the access, or (atomic) the index of its release record
};
struct GlobalShadow {
    Access w;                           // the last store
    Access r0, r1;                      // loads since it, by two different blocks (r0 the latest)
};
constexpr uint32_t kAtomicByte = 0xffffffffu;

struct Rec {                            // one access to a byte of shared memory
    uint32_t bep, wep;                  // block-barrier epoch, warp-sync epoch
    int32_t tid;
};
struct Shadow {
    Rec w, r0, r1;
};

struct Uninit { bool set; int tid; uintptr_t addr; size_t n; int64_t region; uintptr_t off; };

// The per-block part of the runtime, parked while another block runs: the
// running block's state lives in Runtime (where the hot paths find it), and a
// switch exchanges it with the slot of the next block.
struct Slot {
    char* stacks = nullptr;
    size_t stacks_threads = 0;
    Fiber* fibers = nullptr;
    unsigned char* dyn = nullptr;
    uint3 bidx{};
    uint32_t blin = 0, bep = 0, block_bep = 0, lastbar = 0;
    int live = 0, arrived = 0, bar_count = 0, bar_and = 0, bar_or = 0;
    int bar_result_count = 0, bar_result_and = 0, bar_result_or = 0;
    Uninit uninit{};
    uint32_t wep[kMaxThreads / 32] = {};
    unsigned alive[kMaxThreads / 32] = {}, waiting[kMaxThreads / 32] = {};
    std::vector<Shadow> dyn_shadow, bss_shadow;
    std::vector<unsigned char> bss;      // the block's static shared memory while parked
    std::vector<Coverage> covs;
    Coverage block_acquired, block_published;
};

struct Runtime {
    std::mutex mutex;
    Launch* L;
    Buffer* bufs;
    int nbufs;
    bool memcheck, racecheck, initcheck;
    // block
    uint3 bidx, bdim, gdim;
    int nthreads, live, arrived;
    Fiber* fibers;
    Fiber* cur;
    void* sched_sp;
#if !GPUBN_EMU_ASM_SWITCH
    ucontext_t sched_uc;
#endif
    int bar_count, bar_and, bar_or, bar_result_count, bar_result_and, bar_result_or;
    // racecheck epochs (monotonic over the module's lifetime)
    uint32_t epoch, bep, block_bep;       // block_bep: the epoch the current block started at
    // The first load of never-written shared memory, reported at the next barrier
    // (or the end of the block) unless another thread's store to it turns out to
    // be a race first -- a missing barrier is the better diagnosis.
    Uninit uninit;
    uint32_t wep[kMaxThreads / 32];
    unsigned alive[kMaxThreads / 32];    // lanes that exist and have not exited
    unsigned waiting[kMaxThreads / 32];  // lanes waiting in a warp collective
    // memory
    char* stacks;
    size_t stacks_threads;
    unsigned char* dyn;
    uintptr_t dyn_lo;
    size_t dyn_size;
    uintptr_t bss_lo, bss_hi;
    std::vector<Shadow> dyn_shadow, bss_shadow;
    std::vector<std::pair<uintptr_t, uintptr_t>> readonly;
    uintptr_t module_base;
    bool module_scanned;
    std::vector<uint64_t> host_lo;       // where each (staged) buffer lives on the host
    // inter-block racecheck
    bool interblock;                     // racecheck with more than one block
    bool bookkeeping;                    // the runtime's own memcpy/memset calls (not checked)
    uint64_t progress;                   // stores so far (spin-waits end only while there are some)
    bool spun;                           // a spin-wait handed over since the scheduler last looked
    uint32_t gtime;                      // logical time: advances at fences, barriers and atomics
    uint32_t blin;                       // linear index of the running block
    uint32_t lastbar;                    // time of the running block's last barrier
    std::vector<GlobalShadow*> gshadow;  // per buffer: the shadow of its group
    std::vector<uint16_t*> gbefore;      // per buffer: per granule, its value before its last writer's stores
    bool global_report;                  // report inter-block races; else a racing load may read gbefore
    uint64_t stale_rng;                  // draws which racing loads read the value from before the store
    struct {                             // a stale value presented to the load about to run
        uintptr_t addr;
        size_t n;
        unsigned char bytes[64];         // what memory really holds there
    } stale;
    std::vector<uint64_t> goff;          // per buffer: its offset in its group
    std::vector<Coverage> covs;          // threads' pending / acquired coverage (Fiber indices)
    Coverage block_acquired;             // what the running block's threads share since a barrier
    Coverage block_published;            // stores its threads fenced before its last barrier
    std::vector<Coverage> releases;      // per atomic location: what its atomics published
    // the watchdog (see "hoisted spin-waits")
    uint64_t beats;                      // memory accesses and fiber switches so far
    uint64_t beats_seen;                 // at the watchdog's last tick
    int idle_ticks;                      // its ticks since then
    // concurrent blocks
    std::vector<Slot> slots;             // slots[cur_slot] is stale: its block's state is here
    int cur_slot;
};

// Runtime state lives in .data (explicit section) so that the module's .bss holds
// nothing but the kernel's static __shared__ variables (and a few bytes of C runtime).
__attribute__((section(".data.gpubn_emu"))) Runtime* R = nullptr;

}  // namespace

extern "C" char __bss_start[] __attribute__((weak, visibility("hidden")));
extern "C" char _end[] __attribute__((weak, visibility("hidden")));

static uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// ------------------------------------------------------------------ stale loads
// A load that races with another block's store may return the value from
// before that store (see global_access): the hook that runs before the load
// puts the old bytes in place, and the next call into the runtime (the next
// access's hook, or any switch of fibers) puts the real ones back.  No other
// thread runs in between, so only that one load sees the old value.
extern "C" void* __real_memcpy(void*, const void*, size_t);
static inline void settle_stale() {
    if (R && R->stale.n) {
        __real_memcpy((void*)R->stale.addr, R->stale.bytes, R->stale.n);   // unchecked
        R->stale.n = 0;
    }
}

// ------------------------------------------------------------------ context switch
#if GPUBN_EMU_ASM_SWITCH
// x86-64: save the callee-saved registers on the old stack, switch stacks,
// restore them from the new one.  No signal-mask system call (unlike swapcontext).
extern "C" void gpubn_emu_switch(void** save_sp, void* load_sp) EMU_HIDDEN;
asm(R"(
    .text
    .globl gpubn_emu_switch
    .hidden gpubn_emu_switch
    .type gpubn_emu_switch,@function
gpubn_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpubn_emu_switch, .-gpubn_emu_switch
)");
static void fiber_main();
static void* fiber_init_stack(Fiber& f, uintptr_t lo) {
    // Stagger the stack tops: identical page offsets would map every fiber's
    // hot frames to the same L1 cache sets.
    uintptr_t top = (lo + kStack - (uintptr_t)(f.linear % 61) * 64) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                                  // fake return address of fiber_main
    *--sp = (uint64_t)(uintptr_t)&fiber_main;   // popped by `ret`
    for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
    return sp;
}
static inline void ctx_switch(void** save, void* load) {
    settle_stale();
    ++R->beats;
    gpubn_emu_switch(save, load);
}
#else
// Portable fallback: ucontext (swapcontext also saves the signal mask: slower).
static void fiber_main();
static void* fiber_init_stack(Fiber& f, uintptr_t lo) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = (void*)lo;
    f.uc.uc_stack.ss_size = kStack;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
    return &f.uc;
}
static inline void ctx_switch(void** save, void* load) {
    settle_stale();
    ++R->beats;
    swapcontext((ucontext_t*)*save, (ucontext_t*)load);
}
#endif

// ------------------------------------------------------------------ errors
static void set_message(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_message(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(R->L->message, sizeof R->L->message, fmt, ap);
    va_end(ap);
}

static void set_where(const Fiber* f) {
    Launch* L = R->L;
    L->block_idx[0] = R->bidx.x; L->block_idx[1] = R->bidx.y; L->block_idx[2] = R->bidx.z;
    if (f) {
        L->thread_idx[0] = f->tid.x; L->thread_idx[1] = f->tid.y; L->thread_idx[2] = f->tid.z;
    } else {
        L->thread_idx[0] = L->thread_idx[1] = L->thread_idx[2] = -1;
    }
}

// Abandons the calling fiber: back to the scheduler, never to return.
[[noreturn]] static void abort_fiber() {
    Fiber* f = R->cur;
    ctx_switch(&f->sp, R->sched_sp);
    __builtin_unreachable();
}

[[noreturn]] static void kernel_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] static void kernel_error(const char* fmt, ...) {
    Launch* L = R->L;
    L->error = KERNEL;
    set_where(R->cur);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->message, sizeof L->message, fmt, ap);
    va_end(ap);
    abort_fiber();
}

// ------------------------------------------------------------------ module layout
static int phdr_cb(struct dl_phdr_info* info, size_t, void* data) {
    uintptr_t probe = (uintptr_t)data;
    bool mine = false;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& p = info->dlpi_phdr[i];
        if (p.p_type != PT_LOAD) continue;
        uintptr_t lo = info->dlpi_addr + p.p_vaddr;
        if (probe >= lo && probe < lo + p.p_memsz) mine = true;
    }
    if (!mine) return 0;
    R->module_base = info->dlpi_addr;
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& p = info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + p.p_vaddr;
        if ((p.p_type == PT_LOAD && !(p.p_flags & PF_W)) || p.p_type == PT_GNU_RELRO)
            R->readonly.emplace_back(lo, lo + p.p_memsz);
    }
    return 1;
}

static void scan_module() {
    if (R->module_scanned) return;
    R->module_scanned = true;
    dl_iterate_phdr(phdr_cb, (void*)(uintptr_t)&scan_module);
    R->bss_lo = (uintptr_t)__bss_start;
    R->bss_hi = (uintptr_t)_end;
    if (R->bss_hi < R->bss_lo) R->bss_hi = R->bss_lo;
}

// ------------------------------------------------------------------ racecheck
static inline bool ordered(const Rec& r, int tid) {
    if (r.bep < R->bep) return true;            // a __syncthreads since (or another block)
    if (r.tid == tid || r.tid < 0) return true; // same thread, or an atomic
    int w = r.tid >> 5;
    return w == (tid >> 5) && r.wep < R->wep[w]; // same warp, a __syncwarp since
}

[[noreturn]] static void race(const char* what, const Rec& prev, bool prev_store, bool store, uintptr_t addr,
                              int64_t region, uintptr_t offset) {
    Launch* L = R->L;
    Fiber* f = R->cur;
    L->error = RACE;
    set_where(f);
    const Fiber& o = R->fibers[prev.tid];
    L->other_thread[0] = o.tid.x; L->other_thread[1] = o.tid.y; L->other_thread[2] = o.tid.z;
    L->other_is_store = prev_store;
    L->is_store = store;
    L->address = addr;
    L->region = region;
    L->offset = (int64_t)offset;
    set_message("%s", what);
    abort_fiber();
}

// Records the pending uninitialized load as the launch's error; true if there was one.
static bool report_uninitialized() {
    if (!R->uninit.set) return false;
    Launch* L = R->L;
    L->error = MEMCHECK;
    set_where(&R->fibers[R->uninit.tid]);
    L->is_store = 0;
    L->size = (int64_t)R->uninit.n;
    L->address = R->uninit.addr;
    L->region = R->uninit.region;
    L->offset = (int64_t)R->uninit.off;
    set_message("load of shared memory that no thread of this block had written before the next barrier "
                "(uninitialized)");
    return true;
}

static inline void race_access(Shadow* sh, size_t n, bool store, uintptr_t addr, int64_t region, uintptr_t off) {
    const int t = R->cur->linear;
    const Rec now{R->bep, R->wep[t >> 5], t};
    if (!store && R->initcheck) {
        // only when no byte of the access was written: struct padding is never written
        bool any = false;
        for (size_t i = 0; i < n && !any; ++i) any = sh[i].w.bep >= R->block_bep;
        if (!any && !R->uninit.set) R->uninit = {true, t, addr, n, region, off};
    }
    for (size_t i = 0; i < n; ++i) {
        Shadow& s = sh[i];
        if (!ordered(s.w, t))
            race(store ? "write-after-write hazard" : "read-after-write hazard", s.w, true, store, addr + i,
                 region, off + i);
        if (store) {
            if (!ordered(s.r0, t)) race("write-after-read hazard", s.r0, false, true, addr + i, region, off + i);
            if (!ordered(s.r1, t)) race("write-after-read hazard", s.r1, false, true, addr + i, region, off + i);
            s.w = now;
        } else if (s.r0.tid == t) {
            s.r0 = now;
        } else {
            s.r1 = s.r0;
            s.r0 = now;
        }
    }
}

// ------------------------------------------------------------------ inter-block racecheck
// Global memory between blocks, after the PTX memory model's release/acquire
// patterns: a store of block A is visible to block B once A published it (a
// __threadfence() by the storing thread after the store, or by any thread of A
// after a __syncthreads() that follows the store), then an atomic of A after
// that fence released it into an atomic location, and B observed that location
// (an atomic on it, or a load of a value an atomic wrote: release sequences of
// read-modify-writes included) and then fenced; a __syncthreads() shares what a
// thread of B acquired with the whole block.  Any other access by B to bytes A
// stored in this launch is an inter-block race.  A thread's fence followed by
// a __syncthreads() publishes its stores for an atomic by any thread of the
// block after the barrier (every thread fences, one thread signals).  Loads are not told apart from
// volatile loads (a volatile load orders nothing by itself; the fence does).
// Logical time (gtime) advances at fences, barriers and atomics; a store
// happens at the current time.
// The runtime's own containers call memset/memcpy, which the linker sends to
// the checked wrappers: while this guard lives they pass unchecked.
struct Bookkeeping {
    bool saved;
    Bookkeeping() : saved(R->bookkeeping) { R->bookkeeping = true; }
    ~Bookkeeping() { R->bookkeeping = saved; }
};

static inline Coverage& coverage(int& idx) {
    if (idx < 0) {
        idx = (int)R->covs.size();
        R->covs.emplace_back();
    }
    return R->covs[idx];
}
static inline uint64_t writer_id(uint32_t block, uint32_t thread) { return (uint64_t)block << 10 | thread; }

static bool visible(const Fiber* f, uint32_t block, uint32_t thread, uint32_t t) {
    const uint64_t w = writer_id(block, thread);
    if (f->acquired >= 0 && R->covs[f->acquired].covers(block, w, t)) return true;
    return R->block_acquired.covers(block, w, t);
}

static uint3 unlinear(uint32_t i, uint3 d) { return uint3{i % d.x, (i / d.x) % d.y, i / (d.x * d.y)}; }

[[noreturn]] static void global_race(const char* what, const Access& prev, bool prev_store, bool store, int buf,
                                     uint64_t off) {
    Launch* L = R->L;
    L->error = RACE;
    set_where(R->cur);
    const uint3 ob = unlinear((prev.who >> 10) - 1, R->gdim), ot = unlinear(prev.who & 1023, R->bdim);
    L->other_block[0] = ob.x; L->other_block[1] = ob.y; L->other_block[2] = ob.z;
    L->other_thread[0] = ot.x; L->other_thread[1] = ot.y; L->other_thread[2] = ot.z;
    L->other_is_store = prev_store;
    L->is_store = store;
    L->address = R->host_lo[buf] + off;
    L->region = R_GLOBAL;
    L->buffer = R->bufs[buf].arg_index;
    L->offset = (int64_t)off;
    set_message("%s", what);
    abort_fiber();
}

// Whether the running thread's access is ordered after `a`, an access by a thread of another block.
static inline bool ordered_after(const Fiber* f, const Access& a, uint32_t me) {
    return a.who == 0 || (a.who & ~1023u) == me || visible(f, (a.who >> 10) - 1, a.who & 1023, a.t);
}

// Puts the values the granules [k0, k1] held before their last writer's stores
// (those that race: bit k - k0 of `racing`) into the bytes [a, a + n) for the
// load about to run; settle_stale() restores them.
static void present_stale(int buf, uintptr_t a, size_t n, uint64_t k0, uint64_t k1, uint64_t racing) {
    if (n > sizeof R->stale.bytes) return;
    const uintptr_t group_lo = R->bufs[buf].lo - R->goff[buf];    // where granule 0 lives
    const uint16_t* before = R->gbefore[buf];
    __real_memcpy(R->stale.bytes, (const void*)a, n);
    R->stale.addr = a;
    R->stale.n = n;
    for (uint64_t k = k0; k <= k1; ++k) {
        if (!(racing >> (k - k0) & 1)) continue;
        const uint16_t v = before[k];
        for (int b = 0; b < (int)kGranule; ++b) {
            const uintptr_t p = group_lo + k * kGranule + b;
            if (p - a < n) *(unsigned char*)p = (unsigned char)(v >> (8 * b));
        }
    }
}

static void global_atomic(int buf, uint64_t off, size_t n, bool rmw);

static inline void global_access(int buf, uintptr_t a, uint64_t off, size_t n, bool store, bool vol) {
    const uint64_t base = R->goff[buf] + off;
    GlobalShadow* sh = R->gshadow[buf];
    Fiber* f = R->cur;
    const uint32_t me = (R->blin + 1) << 10, id = me | (uint32_t)f->linear;
    const uint64_t k0 = base / kGranule, k1 = (base + n - 1) / kGranule;
    uint64_t racing = 0;                      // granules whose last store this load races with
    for (uint64_t k = k0; k <= k1; ++k) {
        GlobalShadow& g = sh[k];
        const uint64_t first = k * kGranule > base ? k * kGranule - R->goff[buf] : off;
        if (g.w.who == kAtomicByte) {
            // a value an atomic or a volatile store wrote (a strong store): a plain access
            // races with it unless ordered after it; a load observes its release sequence
            const Coverage& rel = R->releases[g.w.t];
            const Access last{rel.last_who, rel.last_t};
            if (!vol && R->global_report && !ordered_after(f, last, me))
                global_race(store ? "write-after-write" : "non-volatile load", last, true, store, buf, first);
            if (!store && (f->seen_release != g.w.t || f->seen_version != rel.version)) {
                Bookkeeping quiet;
                f->seen_release = g.w.t;
                f->seen_version = rel.version;
                coverage(f->pending).merge(rel);
            }
        } else if (!ordered_after(f, g.w, me)) {
            if (R->global_report)
                global_race(store ? "write-after-write" : "read-after-write", g.w, true, store, buf, first);
            if (!store && k - k0 < 64) racing |= 1ull << (k - k0);
        }
        if (store) {
            if (R->global_report) {
                if (!ordered_after(f, g.r0, me)) global_race("write-after-read", g.r0, false, true, buf, first);
                if (!ordered_after(f, g.r1, me)) global_race("write-after-read", g.r1, false, true, buf, first);
            }
            if (g.w.who != id && !vol) {      // the value before this writer's stores (read before the store runs)
                const Buffer& b = R->bufs[buf];
                const uintptr_t p = b.lo - R->goff[buf] + k * kGranule;
                uint16_t v = 0;
                for (int i = 0; i < (int)kGranule; ++i)      // (the granule may pass the buffer's end)
                    if (p + i - b.lo < b.size) v |= (uint16_t)(*(const unsigned char*)(p + i) << (8 * i));
                R->gbefore[buf][k] = v;
            }
            g = GlobalShadow{Access{id, R->gtime}, Access{0, 0}, Access{0, 0}};
        } else if (!vol) {                    // r0: this block's latest plain load; r1: the other block's before it
            if ((g.r0.who & ~1023u) != me) g.r1 = g.r0;
            g.r0 = Access{id, R->gtime};
        }
    }
    f->gaccess_t = R->gtime;
    if (store && vol) global_atomic(buf, off, n, false);   // a strong store: releases like an atomic
    // The load may return what the bytes held before the racing stores (chosen from the seed).
    if (racing && (splitmix(R->stale_rng) & 1)) present_stale(buf, a, n, k0, k1, racing);
}

// An atomic on global memory (rmw), or a volatile store: the atomic acquires
// what the location's earlier strong stores released; both release what the
// thread's last fence published.  The location's plain accesses by other
// blocks must be ordered before it.
static void global_atomic(int buf, uint64_t off, size_t n, bool rmw) {
    Bookkeeping quiet;
    const uint64_t base = R->goff[buf] + off;
    GlobalShadow* sh = R->gshadow[buf];
    Fiber* f = R->cur;
    const uint32_t me = (R->blin + 1) << 10;
    if (rmw && R->global_report) {
        for (uint64_t k = base / kGranule; k <= (base + n - 1) / kGranule; ++k) {
            const GlobalShadow& g = sh[k];
            const uint64_t first = k * kGranule > base ? k * kGranule - R->goff[buf] : off;
            if (g.w.who != kAtomicByte && !ordered_after(f, g.w, me))
                global_race("write-after-write", g.w, true, true, buf, first);
            if (!ordered_after(f, g.r0, me)) global_race("write-after-read", g.r0, false, true, buf, first);
            if (!ordered_after(f, g.r1, me)) global_race("write-after-read", g.r1, false, true, buf, first);
        }
    }
    uint32_t idx;
    if (sh[base / kGranule].w.who == kAtomicByte) {
        idx = sh[base / kGranule].w.t;
    } else {
        idx = (uint32_t)R->releases.size();
        R->releases.emplace_back();
    }
    Coverage& rel = R->releases[idx];
    if (rmw) coverage(f->pending).merge(R->releases[idx]);
    if (!R->block_published.own.empty()) {
        // stores other threads fenced before a barrier this thread has passed
        rel.merge(R->block_published);
        ++rel.version;
    }
    if (f->fence_t) {
        uint32_t& b = rel.bar[R->blin];
        if (f->fence_bar > b) b = f->fence_bar;
        uint32_t& o = rel.own[writer_id(R->blin, f->linear)];
        if (f->fence_t > o) o = f->fence_t;
        ++rel.version;
    }
    rel.last_who = me | (uint32_t)f->linear;
    rel.last_t = R->gtime;
    for (uint64_t k = base / kGranule; k <= (base + n - 1) / kGranule; ++k)
        sh[k] = GlobalShadow{Access{kAtomicByte, idx}, Access{0, 0}, Access{0, 0}};
    ++R->gtime;
}

// ------------------------------------------------------------------ memcheck
[[noreturn]] static void bad_access(uintptr_t a, size_t n, bool store, const char* why) {
    Launch* L = R->L;
    L->error = MEMCHECK;
    set_where(R->cur);
    L->is_store = store;
    L->size = (int64_t)n;
    L->address = a;
    // the nearest argument buffer
    int best = -1;
    uint64_t best_d = ~0ull;
    for (int i = 0; i < R->nbufs; ++i) {
        const Buffer& b = R->bufs[i];
        uint64_t d = a < b.lo ? b.lo - a : (a < b.lo + b.size ? 0 : a - (b.lo + b.size) + 1);
        if (d < best_d) { best_d = d; best = i; }
    }
    if (L->region == R_NONE) {
        L->buffer = best >= 0 ? R->bufs[best].arg_index : -1;
        L->offset = best >= 0 ? (int64_t)(a - R->bufs[best].lo) : 0;
        // inside the staged copy or its gaps: report the address on the host arrays
        if (best >= 0 && best_d <= kStageGap) L->address = R->host_lo[best] + (uint64_t)L->offset;
    }
    set_message("%s", why);
    abort_fiber();
}

[[noreturn]] __attribute__((noinline)) static void misaligned(uintptr_t a, size_t n, bool store) {
    char why[96];
    snprintf(why, sizeof why, "misaligned address (a %zu-byte access must be %zu-byte aligned)", n, n);
    if (a - R->dyn_lo < R->dyn_size) {
        R->L->region = R_DYNAMIC_SHARED;
        R->L->offset = (int64_t)(a - R->dyn_lo);
    } else if (a - R->bss_lo < R->bss_hi - R->bss_lo) {
        R->L->region = R_STATIC_SHARED;
        R->L->offset = (int64_t)(a - R->module_base);
    }
    bad_access(a, n, store, why);
}

// ------------------------------------------------------------------ spin-waits
// Threads switch only at barriers, warp collectives and exits, so a thread that
// spins on memory another thread must change would spin forever.  After
// kSpinLoads consecutive loads of one address the spinning thread hands over to
// the others (its block's threads, then the other running blocks); after
// kSpinRounds hand-overs during which the value did not change and no thread
// anywhere stored anything, the wait can never end (the writer waits at a
// barrier, has exited, or is in a block that has not started) and the launch
// is abandoned.
constexpr uint32_t kSpinLoads = 1u << 12;
constexpr uint32_t kSpinRounds = 256;

[[noreturn]] static void spin_error(Fiber* f, uintptr_t a, size_t n) {
    Launch* L = R->L;
    L->error = DEADLOCK;
    set_where(f);
    L->address = a;
    L->size = (int64_t)n;
    char where[160];
    snprintf(where, sizeof where, "address 0x%lx", (unsigned long)a);
    for (int i = 0; i < R->nbufs; ++i)
        if (a - R->bufs[i].lo < R->bufs[i].size)
            snprintf(where, sizeof where, "argument %lld at offset %llu", (long long)R->bufs[i].arg_index,
                     (unsigned long long)(a - R->bufs[i].lo));
    if (a - R->dyn_lo < R->dyn_size)
        snprintf(where, sizeof where, "byte %lu of dynamic shared memory", (unsigned long)(a - R->dyn_lo));
    else if (a - R->bss_lo < R->bss_hi - R->bss_lo)
        snprintf(where, sizeof where, "static shared memory (module offset 0x%lx)", (unsigned long)(a - R->module_base));
    set_message("spins: %u loads in a row of %zu bytes at %s returned the same value while the other threads ran; "
                "no thread changes it (a writer waiting at a barrier, exited, or in a block that has not "
                "started: an ordinary launch does not make all its blocks co-resident, a cooperative one does)",
                kSpinLoads * kSpinRounds, n, where);
    abort_fiber();
}

static void spin_hand_over(Fiber* f, uintptr_t a, size_t n);

static inline void spin_watch(Fiber* f, uintptr_t a, size_t n) {
    if (a != f->spin_addr) {
        f->spin_addr = a;
        f->spin_count = 0;
        f->spin_rounds = 0;
        return;
    }
    if (++f->spin_count >= kSpinLoads) spin_hand_over(f, a, n);
}

// What kind of access a hook reports: a plain or a volatile one (from the
// instrumentation), or the load or store half of an atomic (atomic_access).
enum AccessKind : int { PLAIN = 0, VOLATILE = 1, ATOMIC = 2 };

static inline void check(uintptr_t a, size_t n, bool store, int kind = PLAIN) {
    Fiber* f = R ? R->cur : nullptr;
    if (!f || n == 0) return;
    settle_stale();
    ++R->beats;
    if (a - f->stack_lo < kStack) {
        if (a + n - f->stack_lo <= kStack) return;
    }
    // An access of 2, 4, 8 or 16 bytes (a scalar, a vector type, a reinterpret_cast
    // load) must be naturally aligned in global and shared memory, as on the GPU.
    // (Accesses of other sizes come from memcpy and struct copies, which the GPU
    // splits into aligned pieces.)
    if ((a & (n - 1)) && (n & (n - 1)) == 0 && n <= 16 && R->memcheck) misaligned(a, n, store);
    for (int i = 0; i < R->nbufs; ++i) {
        Buffer& b = R->bufs[i];
        if (a - b.lo < b.size) {
            if (n > b.lo + b.size - a && R->memcheck)
                bad_access(a, n, store, "access runs past the end of an argument buffer");
            if (store) {
                b.stored += n;
                if (kind != ATOMIC) f->spin_addr = 0;    // an atomic's store half does not end a spin
                ++R->progress;
            } else {
                b.loaded += n;
                spin_watch(f, a, n);    // may hand over: the load then reads what the others stored since
            }
            if (R->interblock && kind != ATOMIC)
                global_access(i, a, a - b.lo, n < b.lo + b.size - a ? n : b.lo + b.size - a, store, kind == VOLATILE);
            return;
        }
    }
    if (a - R->dyn_lo < kDynCap) {
        uintptr_t off = a - R->dyn_lo;
        if (off + n > R->dyn_size) {
            if (!R->memcheck) return;
            R->L->region = R_DYNAMIC_SHARED;
            R->L->offset = (int64_t)off;
            bad_access(a, n, store, "out of bounds of dynamic shared memory");
        }
        if (R->racecheck && kind != ATOMIC) race_access(&R->dyn_shadow[off], n, store, a, R_DYNAMIC_SHARED, off);
        if (!store) spin_watch(f, a, n); else if (kind != ATOMIC) f->spin_addr = 0, ++R->progress;
        return;
    }
    if (a - R->bss_lo < R->bss_hi - R->bss_lo) {
        if (R->racecheck && kind != ATOMIC && a + n <= R->bss_hi)
            race_access(&R->bss_shadow[a - R->bss_lo], n, store, a, R_STATIC_SHARED, a - R->module_base);
        if (!store) spin_watch(f, a, n); else if (kind != ATOMIC) f->spin_addr = 0, ++R->progress;
        return;
    }
    if (!store) {
        for (const auto& r : R->readonly)
            if (a >= r.first && a + n <= r.second) return;
    }
    for (int i = 0; i < R->nthreads; ++i) {
        const Fiber& g = R->fibers[i];
        if (a - g.stack_lo < kStack && R->memcheck)
            bad_access(a, n, store, "access to another thread's stack (local memory is private)");
    }
    if (R->memcheck) {
        if (a < 65536) bad_access(a, n, store, "null pointer dereference (address is not inside any argument "
                                               "buffer or shared memory)");
        bad_access(a, n, store, "address is not inside any argument buffer or shared memory");
    }
}

// The hooks of the thread sanitizer's instrumentation.
#define EMU_TSAN(N)                                                                                    \
    EMU_EXPORT void __tsan_read##N(uintptr_t a) { check(a, N, false); }                                \
    EMU_EXPORT void __tsan_write##N(uintptr_t a) { check(a, N, true); }                                \
    EMU_EXPORT void __tsan_unaligned_read##N(uintptr_t a) { check(a, N, false); }                      \
    EMU_EXPORT void __tsan_unaligned_write##N(uintptr_t a) { check(a, N, true); }                      \
    EMU_EXPORT void __tsan_volatile_read##N(uintptr_t a) { check(a, N, false, VOLATILE); }             \
    EMU_EXPORT void __tsan_volatile_write##N(uintptr_t a) { check(a, N, true, VOLATILE); }
EMU_TSAN(1)
EMU_TSAN(2)
EMU_TSAN(4)
EMU_TSAN(8)
EMU_TSAN(16)
#undef EMU_TSAN
EMU_EXPORT void __tsan_read_range(uintptr_t a, size_t n) { check(a, n, false); }
EMU_EXPORT void __tsan_write_range(uintptr_t a, size_t n) { check(a, n, true); }
// Atomics the compiler itself emits (the guards of function-local statics):
// not kernel memory traffic, so not checked.
#define EMU_TSAN_ATOMIC(N, T)                                                                          \
    EMU_EXPORT T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    EMU_EXPORT void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }
EMU_TSAN_ATOMIC(8, uint8_t)
EMU_TSAN_ATOMIC(16, uint16_t)
EMU_TSAN_ATOMIC(32, uint32_t)
EMU_TSAN_ATOMIC(64, uint64_t)
#undef EMU_TSAN_ATOMIC
EMU_EXPORT void __tsan_init() {}
EMU_EXPORT void __tsan_func_entry(void*) {}
EMU_EXPORT void __tsan_func_exit() {}
// memcpy / memmove / memset calls the compiler leaves in kernel code (variable
// sizes) are redirected here by the linker (--wrap) and checked like any access.
extern "C" void* __real_memcpy(void*, const void*, size_t);
extern "C" void* __real_memmove(void*, const void*, size_t);
extern "C" void* __real_memset(void*, int, size_t);
extern "C" EMU_HIDDEN void* __wrap_memcpy(void* d, const void* s, size_t n) {
    if (R && R->cur && !R->bookkeeping) { check((uintptr_t)s, n, false); check((uintptr_t)d, n, true); }
    return __real_memcpy(d, s, n);
}
extern "C" EMU_HIDDEN void* __wrap_memmove(void* d, const void* s, size_t n) {
    if (R && R->cur && !R->bookkeeping) { check((uintptr_t)s, n, false); check((uintptr_t)d, n, true); }
    return __real_memmove(d, s, n);
}
extern "C" EMU_HIDDEN void* __wrap_memset(void* d, int c, size_t n) {
    if (R && R->cur && !R->bookkeeping) check((uintptr_t)d, n, true);
    return __real_memset(d, c, n);
}

// ------------------------------------------------------------------ device API
namespace gpubn_emu {

uint3 thread_idx() { return R->cur->tid; }
uint3 block_idx() { return R->bidx; }
uint3 block_dim() { return R->bdim; }
uint3 grid_dim() { return R->gdim; }
unsigned char* dynamic_smem() { return R->dyn; }

// Hands the processor to the next runnable thread of the block (in thread
// order), or back to the scheduler when there is none after this one: one
// switch per hand-off instead of two.
static inline void yield(Fiber* f) {
    for (int j = f->linear + 1; j < R->nthreads; ++j) {
        Fiber* next = &R->fibers[j];
        if (next->state == RUN) {
            R->cur = next;
            ctx_switch(&f->sp, next->sp);
            return;
        }
    }
    ctx_switch(&f->sp, R->sched_sp);
}

static void barrier(void* site, int pred) {
    Fiber* f = R->cur;
    f->state = BAR;
    f->site = site;
    ++R->arrived;
    R->bar_count += pred != 0;
    R->bar_and &= pred != 0;
    R->bar_or |= pred != 0;
    // One block-wide barrier, whatever the call site (bar.sync 0 on sm_70+): the
    // compiler may duplicate a __syncthreads() call (tail duplication), so
    // threads meeting at one source-level barrier can arrive from different
    // code addresses.  It completes when every thread of the block has arrived;
    // a thread that has exited never arrives, so the others deadlock (CUDA
    // requires every thread of the block to reach the barrier).
    if (R->arrived == R->live && R->live == R->nthreads) {
        if (report_uninitialized()) abort_fiber();
        R->arrived = 0;
        R->bar_result_count = R->bar_count;
        R->bar_result_and = R->bar_and;
        R->bar_result_or = R->bar_or;
        R->bar_count = 0; R->bar_and = 1; R->bar_or = 0;
        R->bep = ++R->epoch;
        for (int i = 0; i < R->nthreads; ++i) R->fibers[i].state = RUN;
        if (R->interblock) {
            Bookkeeping quiet;
            // a barrier orders the block's stores before it (for a later fence to
            // publish) and shares what its threads acquired
            R->lastbar = ++R->gtime;
            for (int i = 0; i < R->nthreads; ++i) {
                const Fiber& t = R->fibers[i];
                if (t.acquired >= 0) R->block_acquired.merge(R->covs[t.acquired]);
                if (t.gaccess_t && t.fence_t > t.gaccess_t) {   // accessed global memory, then fenced
                    uint32_t& o = R->block_published.own[writer_id(R->blin, t.linear)];
                    if (t.fence_t > o) o = t.fence_t;
                }
            }
        }
    }
    // Even the thread that completed the barrier yields, so that the block
    // resumes in thread order.
    yield(f);
}

__attribute__((noinline)) void syncthreads() { barrier(__builtin_return_address(0), 1); }
__attribute__((noinline)) int syncthreads_count(int p) {
    barrier(__builtin_return_address(0), p);
    return R->bar_result_count;
}
__attribute__((noinline)) int syncthreads_and(int p) {
    barrier(__builtin_return_address(0), p);
    return R->bar_result_and;
}
__attribute__((noinline)) int syncthreads_or(int p) {
    barrier(__builtin_return_address(0), p);
    return R->bar_result_or;
}

static const char* op_name(int op) {
    switch (op) {
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        case SHFL_XOR: return "__shfl_xor_sync";
        case BALLOT: return "__ballot_sync";
        case ANY: return "__any_sync";
        case ALL: return "__all_sync";
        case SYNC: return "__syncwarp";
        case MATCH_ANY: return "__match_any_sync";
        default: return "__reduce_*_sync";
    }
}

static inline unsigned lanes_alive(int warp) { return R->alive[warp]; }

unsigned activemask() { return lanes_alive(R->cur->warp); }

static void complete(int warp, unsigned mask, int op) {
    Fiber* w = R->fibers + warp * 32;
    const unsigned long long poison = ~0ull;
    unsigned long long acc = 0;
    if (op == BALLOT || op == ANY || op == ALL) {
        for (int l = 0; l < 32; ++l)
            if ((mask >> l & 1) && w[l].value) acc |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
        if (!(mask >> l & 1)) continue;
        Fiber& f = w[l];
        const int width = f.width, base = l & ~(width - 1);
        int src = l;
        switch (op) {
            case SHFL_IDX: src = base + (f.arg & (width - 1)); break;
            case SHFL_UP: src = (l - base) >= f.arg ? l - f.arg : l; break;
            case SHFL_DOWN: src = (l - base) + f.arg < width ? l + f.arg : l; break;
            case SHFL_XOR: src = l ^ f.arg; if (src >= base + width || src > 31 || src < 0) src = l; break;
            default: break;
        }
        switch (op) {
            case SHFL_IDX: case SHFL_UP: case SHFL_DOWN: case SHFL_XOR:
                f.result = (mask >> src & 1) ? w[src].value : poison;
                break;
            case BALLOT: f.result = acc; break;
            case ANY: f.result = acc != 0; break;
            case ALL: f.result = (unsigned)acc == mask; break;
            case SYNC: f.result = 0; break;
            case MATCH_ANY: {
                unsigned m = 0;
                for (int k = 0; k < 32; ++k)
                    if ((mask >> k & 1) && w[k].value == f.value) m |= 1u << k;
                f.result = m;
                break;
            }
            default: {
                unsigned long long r = f.value;
                for (int k = 0; k < 32; ++k) {
                    if (!(mask >> k & 1)) continue;
                    unsigned v = (unsigned)w[k].value;
                    unsigned cur = (unsigned)r;
                    switch (op) {
                        case REDUCE_ADD: if (k != l) r = cur + v; break;
                        case REDUCE_MIN: r = v < cur ? v : cur; break;
                        case REDUCE_MAX: r = v > cur ? v : cur; break;
                        case REDUCE_MIN_S: r = (unsigned)((int)v < (int)cur ? (int)v : (int)cur); break;
                        case REDUCE_MAX_S: r = (unsigned)((int)v > (int)cur ? (int)v : (int)cur); break;
                        case REDUCE_AND: r = cur & v; break;
                        case REDUCE_OR: r = cur | v; break;
                        case REDUCE_XOR: if (k != l) r = cur ^ v; break;
                    }
                }
                f.result = r;
            }
        }
    }
    for (int l = 0; l < 32; ++l)
        if (mask >> l & 1) w[l].state = RUN;
    R->waiting[warp] &= ~mask;
    // Every warp collective synchronizes the lanes it names (they all arrived);
    // __syncwarp also orders their shared-memory accesses.
    if (op == SYNC) R->wep[warp] = ++R->epoch;
}

unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width, int size) {
    Fiber* f = R->cur;
    (void)size;
    if (!(mask >> f->lane & 1))
        kernel_error("%s: the calling lane %d is not in the mask 0x%08x", op_name(op), f->lane, mask);
    if (width < 1 || width > 32 || (width & (width - 1)))
        kernel_error("%s: width %d is not a power of two in [1, 32]", op_name(op), width);
    unsigned alive = lanes_alive(f->warp);
    if (mask & ~alive) {
        unsigned bad = mask & ~alive;
        int l = __builtin_ctz(bad);
        int t = f->warp * 32 + l;
        kernel_error("%s with mask 0x%08x names lane %d (thread %d), which %s", op_name(op), mask, l, t,
                     t >= R->nthreads ? "does not exist in this block" : "has exited");
    }
    f->state = WARP;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    unsigned& waiting = R->waiting[f->warp];
    waiting |= 1u << f->lane;
    if ((waiting & mask) == mask) {
        Fiber* w = R->fibers + f->warp * 32;
        bool all = true;
        for (int l = 0; l < 32 && all; ++l)
            if (mask >> l & 1) all = w[l].mask == mask && w[l].op == op;
        if (all) complete(f->warp, mask, op);
    }
    yield(f);  // the lanes resume in lane order
    return f->result;
}

void syncwarp(unsigned mask) { warp_op(SYNC, mask, 0, 0, 32, 0); }

void atomic_access(const volatile void* addr, size_t size) {
    // An atomic is checked like a load and a store (memcheck, traffic; the load
    // half may hand over in a spin-wait), but is never a shared-memory race; on
    // shared memory it counts as initializing the bytes.  Between blocks, see
    // global_atomic.
    check((uintptr_t)addr, size, false, ATOMIC);
    check((uintptr_t)addr, size, true, ATOMIC);
    if (!R->racecheck) return;
    const uintptr_t a = (uintptr_t)addr;
    if (R->interblock) {
        for (int i = 0; i < R->nbufs; ++i) {
            const Buffer& b = R->bufs[i];
            if (a - b.lo < b.size && size <= b.lo + b.size - a) {
                global_atomic(i, a - b.lo, size, true);
                return;
            }
        }
    }
    Shadow* sh = nullptr;
    if (a - R->dyn_lo < R->dyn_size) sh = &R->dyn_shadow[a - R->dyn_lo];
    else if (a - R->bss_lo < R->bss_hi - R->bss_lo) sh = &R->bss_shadow[a - R->bss_lo];
    if (!sh) return;
    for (size_t i = 0; i < size; ++i) sh[i].w = Rec{R->bep, 0, -1};
}

void threadfence() {
    if (!R->interblock) return;
    Bookkeeping quiet;
    Fiber* f = R->cur;
    f->fence_t = ++R->gtime;
    f->fence_bar = R->lastbar;
    if (f->pending >= 0) {
        Coverage& acquired = coverage(f->acquired);
        Coverage& pending = R->covs[f->pending];
        acquired.merge(pending);
        pending.bar.clear();
        pending.own.clear();
    }
}

long long clock64() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

void trap(const char* what) { kernel_error("%s was called", what); }

}  // namespace gpubn_emu

// assert() in device code: a failed assertion aborts the launch with a
// KernelError (CUDA's "device-side assert triggered"), not the process.
EMU_EXPORT void __assert_fail(const char* expr, const char* file, unsigned line, const char* func) noexcept {
    if (R && R->cur)
        kernel_error("assertion `%s' failed at %s:%u in %s", expr, file, line, func);
    fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, func, expr);
    abort();
}

namespace gpubn_emu {

}  // namespace gpubn_emu

static void spin_hand_over(Fiber* f, uintptr_t a, size_t n) {
    unsigned long long v = 0;
    for (size_t i = 0; i < n && i < 8; ++i)                 // the address was checked
        v |= (unsigned long long)((const unsigned char*)a)[i] << (8 * i);
    if (f->spin_rounds == 0 || v != f->spin_value || R->progress != f->spin_progress) {
        f->spin_value = v;
        f->spin_rounds = 0;
        f->spin_progress = R->progress;
    }
    f->spin_count = 0;
    R->spun = true;
    if (++f->spin_rounds > kSpinRounds) spin_error(f, a, n);
    // move to the back: the scheduler's next round starts at the first runnable thread
    gpubn_emu::yield(f);
}

// ------------------------------------------------------------------ scheduler
static void fiber_main() {
    Fiber* f = R->cur;
    ((void (*)(void**))(uintptr_t)R->L->thunk)((void**)(uintptr_t)R->L->args);
    f->state = DONE;
    --R->live;
    R->alive[f->warp] &= ~(1u << f->lane);
    // Lanes of this warp waiting in a collective that names this lane would wait forever.
    Fiber* w = R->fibers + f->warp * 32;
    for (int l = 0; l < 32 && f->warp * 32 + l < R->nthreads; ++l) {
        if (w[l].state == WARP && (w[l].mask >> f->lane & 1)) {
            R->L->error = KERNEL;
            set_where(&w[l]);
            set_message("%s with mask 0x%08x names lane %d (thread %d), which has exited",
                        gpubn_emu::op_name(w[l].op), w[l].mask, f->lane, f->linear);
            break;
        }
    }
    if (!R->L->error) gpubn_emu::yield(f);
    ctx_switch(&f->sp, R->sched_sp);
    __builtin_unreachable();
}

static void format_ranges(std::string& out, const std::vector<int>& ids) {
    char buf[64];
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (!out.empty() && out.back() != ' ') out += ", ";
        if (j == i)
            snprintf(buf, sizeof buf, "%d", ids[i]);
        else
            snprintf(buf, sizeof buf, "%d-%d", ids[i], ids[j]);
        out += buf;
        i = j + 1;
    }
}

static void report_deadlock() {
    Launch* L = R->L;
    L->error = DEADLOCK;
    set_where(nullptr);
    // group the threads by what they are doing
    std::vector<std::pair<std::string, std::vector<int>>> groups;
    std::vector<void*> sites;
    for (int i = 0; i < R->nthreads; ++i) {
        const Fiber& f = R->fibers[i];
        char key[160];
        if (f.state == DONE) {
            snprintf(key, sizeof key, "have exited");
        } else if (f.state == BAR) {
            size_t s = 0;
            while (s < sites.size() && sites[s] != f.site) ++s;
            if (s == sites.size()) sites.push_back(f.site);
            snprintf(key, sizeof key, "wait at __syncthreads #%zu (code offset 0x%lx)", s + 1,
                     (unsigned long)((uintptr_t)f.site - R->module_base));
        } else if (f.state == WARP) {
            snprintf(key, sizeof key, "wait at %s (mask 0x%08x)", gpubn_emu::op_name(f.op), f.mask);
        } else {
            snprintf(key, sizeof key, "are runnable");
        }
        size_t g = 0;
        while (g < groups.size() && groups[g].first != key) ++g;
        if (g == groups.size()) groups.push_back({key, {}});
        groups[g].second.push_back(i);
    }
    std::string msg;
    for (auto& g : groups) {
        if (!msg.empty()) msg += "; ";
        std::string r, what = g.first;
        format_ranges(r, g.second);
        if (g.second.size() == 1) {  // singular
            if (what.compare(0, 4, "have") == 0) what = "has" + what.substr(4);
            else if (what.compare(0, 4, "wait") == 0) what = "waits" + what.substr(4);
            else if (what.compare(0, 3, "are") == 0) what = "is" + what.substr(3);
        }
        msg += (g.second.size() == 1 ? "thread " : "threads ") + r + " " + what;
    }
    snprintf(L->message, sizeof L->message, "%s", msg.c_str());
}

static bool ensure_memory(int nthreads, size_t dyn_size) {
    if ((size_t)nthreads > R->stacks_threads) {
        if (R->stacks) munmap(R->stacks, R->stacks_threads * (kStack + kGuard));
        size_t bytes = (size_t)nthreads * (kStack + kGuard);
        void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return false;
        R->stacks = (char*)p;
        R->stacks_threads = nthreads;
        for (int i = 0; i < nthreads; ++i) mprotect(R->stacks + i * (kStack + kGuard), kGuard, PROT_NONE);
        delete[] R->fibers;
        R->fibers = new Fiber[nthreads];
    }
    if (!R->dyn) {
        void* p = mmap(nullptr, kDynCap + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
        mprotect((char*)p + kDynCap, kGuard, PROT_NONE);
        R->dyn = (unsigned char*)p;
        R->dyn_lo = (uintptr_t)p;
    }
    R->dyn_size = dyn_size;
    if (R->racecheck) {
        if (R->dyn_shadow.size() < dyn_size) R->dyn_shadow.resize(dyn_size);
        size_t bss = R->bss_hi - R->bss_lo;
        if (R->bss_shadow.size() < bss) R->bss_shadow.resize(bss);
    }
    return true;
}

static void start_block(uint3 b) {
    R->bidx = b;
    const int n = R->nthreads;
    const uint3 d = R->bdim;
    for (int i = 0; i < n; ++i) {
        Fiber& f = R->fibers[i];
        f.linear = i;
        f.tid = uint3{(unsigned)(i % d.x), (unsigned)((i / d.x) % d.y), (unsigned)(i / (d.x * d.y))};
        f.warp = i >> 5;
        f.lane = i & 31;
        f.state = RUN;
        f.site = nullptr;
        f.mask = 0;
        f.op = -1;
        f.stack_lo = (uintptr_t)(R->stacks + (size_t)i * (kStack + kGuard) + kGuard);
        f.spin_addr = 0;
        f.spin_count = f.spin_rounds = 0;
        f.fence_t = f.fence_bar = f.gaccess_t = 0;
        f.pending = f.acquired = -1;
        f.seen_release = ~0u;
        f.seen_version = 0;
        f.sp = fiber_init_stack(f, f.stack_lo);
    }
    R->covs.clear();
    R->block_acquired = Coverage();
    R->block_published = Coverage();
    R->lastbar = 0;
    R->blin = b.x + R->gdim.x * (b.y + R->gdim.y * b.z);
    R->live = n;
    R->arrived = 0;
    R->bar_count = 0; R->bar_and = 1; R->bar_or = 0;
#if !GPUBN_EMU_ASM_SWITCH
    R->sched_sp = &R->sched_uc;
#endif
    R->bep = R->block_bep = ++R->epoch;
    R->uninit.set = false;
    for (int w = 0; w < (n + 31) / 32; ++w) {
        R->wep[w] = R->epoch;
        R->waiting[w] = 0;
        R->alive[w] = n - 32 * w >= 32 ? ~0u : (1u << (n - 32 * w)) - 1;
    }
    // Uninitialized shared memory reads as NaN / -1, as garbage would on a GPU.
    if (R->dyn_size) memset(R->dyn, 0xff, R->dyn_size);
}

// One round of the running block: from its first runnable thread, each thread
// hands over to the next runnable one (yield) until the last returns here.
// 0: more to run; 1: the block has finished; -1: an error was recorded.
static int run_round() {
    const int n = R->nthreads;
    int i = 0;
    while (i < n && R->fibers[i].state != RUN) ++i;
    if (i == n) {
        if (R->live == 0) return report_uninitialized() ? -1 : 1;
        report_deadlock();
        return -1;
    }
    R->cur = &R->fibers[i];
    ctx_switch(&R->sched_sp, R->fibers[i].sp);
    R->cur = nullptr;
    return R->L->error ? -1 : 0;
}

static void exchange(Slot& s) {
    using std::swap;
    swap(R->stacks, s.stacks);
    swap(R->stacks_threads, s.stacks_threads);
    swap(R->fibers, s.fibers);
    swap(R->dyn, s.dyn);
    R->dyn_lo = (uintptr_t)R->dyn;
    swap(R->bidx, s.bidx);
    swap(R->blin, s.blin);
    swap(R->bep, s.bep);
    swap(R->block_bep, s.block_bep);
    swap(R->lastbar, s.lastbar);
    swap(R->live, s.live);
    swap(R->arrived, s.arrived);
    swap(R->bar_count, s.bar_count);
    swap(R->bar_and, s.bar_and);
    swap(R->bar_or, s.bar_or);
    swap(R->bar_result_count, s.bar_result_count);
    swap(R->bar_result_and, s.bar_result_and);
    swap(R->bar_result_or, s.bar_result_or);
    swap(R->uninit, s.uninit);
    swap(R->wep, s.wep);
    swap(R->alive, s.alive);
    swap(R->waiting, s.waiting);
    swap(R->dyn_shadow, s.dyn_shadow);
    swap(R->bss_shadow, s.bss_shadow);
    swap(R->covs, s.covs);
    swap(R->block_acquired, s.block_acquired);
    swap(R->block_published, s.block_published);
}

// After a launch every slot gives its memory back.  A slot's stacks, with a
// guard page per thread, are two memory mappings per thread: kept across
// launches, the many modules of a long process (a test suite) would pass the
// kernel's limit on mappings (vm.max_map_count, 65530 by default).  Mapping
// them again costs one mmap and a guard mprotect per thread at the next launch.
static void switch_to(int k);
static void free_memory(char*& stacks, size_t& threads, Fiber*& fibers, unsigned char*& dyn) {
    if (stacks) munmap(stacks, threads * (kStack + kGuard));
    if (dyn) munmap(dyn, kDynCap + kGuard);
    delete[] fibers;
    stacks = nullptr;
    threads = 0;
    fibers = nullptr;
    dyn = nullptr;
}
static void release_slots() {
    switch_to(0);
    while (R->slots.size() > 1) {
        Slot& s = R->slots.back();
        free_memory(s.stacks, s.stacks_threads, s.fibers, s.dyn);
        R->slots.pop_back();
    }
    free_memory(R->stacks, R->stacks_threads, R->fibers, R->dyn);  // slot 0's, running
    R->dyn_lo = 0;
}

// Makes slot k's block the running one.
static void switch_to(int k) {
    if (k == R->cur_slot) return;
    Slot& from = R->slots[R->cur_slot];
    Slot& to = R->slots[k];
    exchange(from);                    // park the running block
    exchange(to);                      // and take k's
    // static shared memory: the module's copy is the running block's
    const size_t nbss = R->bss_hi - R->bss_lo;
    if (nbss) {
        from.bss.resize(nbss);
        memcpy(from.bss.data(), (const void*)R->bss_lo, nbss);
        if (to.bss.size() == nbss) memcpy((void*)R->bss_lo, to.bss.data(), nbss);
    }
    R->cur_slot = k;
}


EMU_EXPORT int64_t gpubn_emu_abi_version() { return 1; }
EMU_EXPORT int64_t gpubn_emu_launch_size() { return (int64_t)sizeof(Launch); }
EMU_EXPORT int64_t gpubn_emu_max_dynamic_shared() { return (int64_t)kDynCap; }

__attribute__((section(".data.gpubn_emu"))) static std::mutex* init_mutex = new std::mutex();

// ------------------------------------------------------------------ faults
// While a launch runs, SIGSEGV/SIGBUS raised by kernel code (a thread running
// off its stack into the guard page, or a wild access with memcheck off) abort
// the launch with a KernelError instead of killing the process.  The handler
// runs on an alternate stack and switches straight back to the scheduler; any
// other fault goes to the previous handler.
namespace {
struct FaultState {
    struct sigaction old_segv, old_bus;
    stack_t old_stack;
    char* alt;
    pthread_t owner;   // the thread running the launch
};
__attribute__((section(".data.gpubn_emu"))) FaultState* g_fault = nullptr;
}  // namespace

static void fault_handler(int sig, siginfo_t* si, void*) {
    Fiber* f = R ? R->cur : nullptr;
    if (!f || !R->L || !pthread_equal(pthread_self(), g_fault->owner)) {
        // not kernel code: let the previous handler have it (the access faults again)
        sigaction(SIGSEGV, &g_fault->old_segv, nullptr);
        sigaction(SIGBUS, &g_fault->old_bus, nullptr);
        return;
    }
    const uintptr_t a = (uintptr_t)si->si_addr;
    Launch* L = R->L;
    L->error = KERNEL;
    set_where(f);
    L->address = a;
    if (a >= f->stack_lo - kGuard - 4096 && a < f->stack_lo)
        snprintf(L->message, sizeof L->message,
                 "stack overflow: the thread used more than its %zu KiB stack (deep recursion or large local "
                 "arrays)", kStack / 1024);
    else
        snprintf(L->message, sizeof L->message, "%s at address 0x%lx (an access memcheck did not check%s)",
                 sig == SIGBUS ? "bus error" : "segmentation fault", (unsigned long)a,
                 R->memcheck ? "" : ": memcheck is off");
    ctx_switch(&f->sp, R->sched_sp);
}

// ------------------------------------------------------------------ hoisted spin-waits
// A spin-wait on a plain load is a loop the compiler may reduce to a jump: the
// load moves out of the loop (on the GPU too), so the loop never sees another
// block's store, never calls the runtime, and would hang the process.  A timer
// on the launching thread's CPU time ticks every kWatchTick; after
// kWatchTicks ticks with no memory access and no switch of fibers, the running
// thread is abandoned and the launch reports the hang.
constexpr long kWatchTickNs = 200 * 1000 * 1000;
constexpr int kWatchTicks = 10;
constexpr int kWatchSignal = SIGVTALRM;

static void watchdog_handler(int, siginfo_t*, void*) {
    Fiber* f = R ? R->cur : nullptr;
    if (!f || !R->L || !g_fault || !pthread_equal(pthread_self(), g_fault->owner)) return;
    if (R->beats != R->beats_seen) {
        R->beats_seen = R->beats;
        R->idle_ticks = 0;
        return;
    }
    if (++R->idle_ticks < kWatchTicks) return;
    Launch* L = R->L;
    L->error = DEADLOCK;
    set_where(f);
    const uintptr_t a = f->spin_addr;
    L->address = a;
    char where[128] = "";
    for (int i = 0; i < R->nbufs; ++i)
        if (a - R->bufs[i].lo < R->bufs[i].size)
            snprintf(where, sizeof where, " (argument %lld at offset %llu)", (long long)R->bufs[i].arg_index,
                     (unsigned long long)(a - R->bufs[i].lo));
    snprintf(L->message, sizeof L->message,
             "runs on without a memory access or a synchronization for %.1f s of CPU time after its last load%s: a "
             "spin-wait on a plain (non-volatile) load, which the compiler moved out of the loop (as it may on a "
             "GPU: the loop never sees another block's store); load the flag with a volatile load or an atomic",
             kWatchTicks * kWatchTickNs / 1e9, where);
    ctx_switch(&f->sp, R->sched_sp);
}

// Armed for the launch; the handler stays installed (it ignores ticks outside
// a launch), so a tick still pending after the timer is deleted is harmless.
static bool arm_watchdog(timer_t* timer) {
    __attribute__((section(".data.gpubn_emu"))) static bool installed = false;
    if (!installed) {
        struct sigaction sa {};
        sa.sa_sigaction = watchdog_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(kWatchSignal, &sa, nullptr) != 0) return false;
        installed = true;
    }
    R->beats_seen = R->beats;
    R->idle_ticks = 0;
    struct sigevent sev {};
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = kWatchSignal;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_THREAD_CPUTIME_ID, &sev, timer) != 0) return false;
    struct itimerspec its {};
    its.it_value.tv_nsec = its.it_interval.tv_nsec = kWatchTickNs;
    timer_settime(*timer, 0, &its, nullptr);
    return true;
}

static void install_fault_handler() {
    if (!g_fault) {
        g_fault = new FaultState();
        g_fault->alt = (char*)mmap(nullptr, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    g_fault->owner = pthread_self();
    stack_t st{};
    st.ss_sp = g_fault->alt;
    st.ss_size = 65536;
    sigaltstack(&st, &g_fault->old_stack);
    struct sigaction sa {};
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_fault->old_segv);
    sigaction(SIGBUS, &sa, &g_fault->old_bus);
}

static void restore_fault_handler() {
    sigaction(SIGSEGV, &g_fault->old_segv, nullptr);
    sigaction(SIGBUS, &g_fault->old_bus, nullptr);
    sigaltstack(&g_fault->old_stack, nullptr);
}

// ------------------------------------------------------------------ buffer staging
// Each argument buffer (or group of overlapping ones: the same array passed
// twice, overlapping views) runs in its own copy, mapped with kStageGap bytes
// of inaccessible address space on either side and at the same offset within
// its page as the host array (so alignment is what the kernel sees on the
// host).  A pointer derived from one argument therefore cannot silently land
// in another, whatever the host allocator placed next to it: it lands in the
// gap, and memcheck names the argument it came from.  The copies are written
// back after the launch (also after an error: the stores made before it stay).
struct Stage {
    uintptr_t host_lo, host_hi;   // the group's host range
    char* map;                    // the reservation, gaps included
    size_t map_len;
    uintptr_t dev_lo;             // where host_lo is staged
    GlobalShadow* shadow;         // inter-block racecheck: one entry per granule (zero pages until accessed)
    size_t shadow_len;
    uint16_t* before;             // per granule: its value before its last writer's stores (zero pages until stored)
    size_t before_len;
};

static bool stage_buffers(std::vector<Stage>& stages) {
    std::vector<uint64_t>& host_lo = R->host_lo;
    const int n = R->nbufs;
    host_lo.resize(n);
    std::vector<int> order(n);
    for (int i = 0; i < n; ++i) { order[i] = i; host_lo[i] = R->bufs[i].lo; }
    std::sort(order.begin(), order.end(), [](int a, int b) { return R->bufs[a].lo < R->bufs[b].lo; });
    std::vector<int> group(n);
    for (int k = 0; k < n; ++k) {
        const Buffer& b = R->bufs[order[k]];
        if (stages.empty() || b.lo >= stages.back().host_hi)
            stages.push_back(Stage{b.lo, b.lo + b.size, nullptr, 0, 0, nullptr, 0, nullptr, 0});
        else if (b.lo + b.size > stages.back().host_hi)
            stages.back().host_hi = b.lo + b.size;
        group[order[k]] = (int)stages.size() - 1;
    }
    const size_t page = 4096;
    for (Stage& s : stages) {
        const size_t in_page = s.host_lo & (page - 1);
        const size_t body = (in_page + (s.host_hi - s.host_lo) + page - 1) & ~(page - 1);
        s.map_len = body + 2 * kStageGap;
        void* p = mmap(nullptr, s.map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) { s.map = nullptr; return false; }
        s.map = (char*)p;
        if (mprotect(s.map + kStageGap, body, PROT_READ | PROT_WRITE) != 0) return false;
        s.dev_lo = (uintptr_t)(s.map + kStageGap + in_page);
        memcpy((void*)s.dev_lo, (const void*)s.host_lo, s.host_hi - s.host_lo);
        if (R->interblock) {
            s.shadow_len = ((s.host_hi - s.host_lo) / kGranule + 1) * sizeof(GlobalShadow);
            void* q = mmap(nullptr, s.shadow_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
            if (q == MAP_FAILED) { s.shadow = nullptr; return false; }
            s.shadow = (GlobalShadow*)q;
            s.before_len = ((s.host_hi - s.host_lo) / kGranule + 1) * sizeof(uint16_t);
            q = mmap(nullptr, s.before_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (q == MAP_FAILED) { s.before = nullptr; return false; }
            s.before = (uint16_t*)q;
        }
    }
    R->gshadow.assign(n, nullptr);
    R->gbefore.assign(n, nullptr);
    R->goff.assign(n, 0);
    void** args = (void**)(uintptr_t)R->L->args;
    for (int i = 0; i < n; ++i) {
        Buffer& b = R->bufs[i];
        const Stage& s = stages[group[i]];
        const uintptr_t dev = s.dev_lo + (b.lo - s.host_lo);
        uintptr_t* cell = (uintptr_t*)args[b.arg_index];
        if (*cell == b.lo) *cell = dev;     // the argument's pointer (Python passes the array's start)
        R->gshadow[i] = s.shadow;
        R->gbefore[i] = s.before;
        R->goff[i] = b.lo - s.host_lo;
        b.lo = dev;
    }
    return true;
}

static void unstage_buffers(std::vector<Stage>& stages) {
    const std::vector<uint64_t>& host_lo = R->host_lo;
    for (Stage& s : stages) {
        if (!s.map) continue;
        if (s.dev_lo) memcpy((void*)s.host_lo, (const void*)s.dev_lo, s.host_hi - s.host_lo);
        munmap(s.map, s.map_len);
        if (s.shadow) munmap(s.shadow, s.shadow_len);
        if (s.before) munmap(s.before, s.before_len);
    }
    for (int i = 0; i < R->nbufs && i < (int)host_lo.size(); ++i) R->bufs[i].lo = host_lo[i];
}

EMU_EXPORT int64_t gpubn_emu_launch(Launch* L) {
    {
        std::lock_guard<std::mutex> g(*init_mutex);
        if (!R) R = new Runtime();
    }
    std::lock_guard<std::mutex> guard(R->mutex);
    R->L = L;
    L->error = OK;
    L->message[0] = 0;
    L->buffer = -1;
    L->region = R_NONE;
    L->blocks_run = 0;
    const int64_t nt = L->block[0] * L->block[1] * L->block[2];
    if (nt < 1 || nt > kMaxThreads) {
        L->error = CONFIG;
        set_message("block has %lld threads; it must have 1 to %d", (long long)nt, kMaxThreads);
        R->L = nullptr;
        return L->error;
    }
    if (L->shared_mem < 0 || (uint64_t)L->shared_mem > kDynCap) {
        L->error = CONFIG;
        set_message("shared_mem=%lld exceeds the %zu bytes of dynamic shared memory available",
                    (long long)L->shared_mem, kDynCap);
        R->L = nullptr;
        return L->error;
    }
    scan_module();
    R->memcheck = L->memcheck != 0;
    R->racecheck = L->racecheck != 0;
    R->initcheck = R->racecheck && L->initcheck != 0;
    R->bufs = (Buffer*)(uintptr_t)L->buffers;
    R->nbufs = (int)L->nbuffers;
    R->nthreads = (int)nt;
    R->bdim = uint3{(unsigned)L->block[0], (unsigned)L->block[1], (unsigned)L->block[2]};
    R->gdim = uint3{(unsigned)L->grid[0], (unsigned)L->grid[1], (unsigned)L->grid[2]};
    const uint64_t nblocks = (uint64_t)L->grid[0] * L->grid[1] * L->grid[2];
    std::vector<uint64_t> order;
    if (L->shuffle) {
        order.resize(nblocks);
        for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
        uint64_t s = (uint64_t)L->seed;
        for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[splitmix(s) % i]);
    }
    R->interblock = R->racecheck && nblocks > 1 && nblocks < (1u << 22) - 1 && nt <= 1024;
    R->gtime = 1;
    R->releases.clear();
    R->global_report = L->global_report != 0;
    R->stale_rng = (uint64_t)L->seed ^ 0x2545f4914f6cdd1dull;
    R->stale.n = 0;
    std::vector<Stage> stages;
    if (!stage_buffers(stages)) {
        unstage_buffers(stages);
        L->error = CONFIG;
        set_message("cannot map the staged argument buffers: %s", strerror(errno));
        R->L = nullptr;
        return L->error;
    }
    // Blocks run as groups of fibers: up to `resident` blocks at a time, started
    // in order (or the seed's order), interleaved; a finished block makes room
    // for the next.
    const int resident = (int)std::max<int64_t>(1, std::min<int64_t>(L->resident, (int64_t)nblocks));
    if (R->slots.empty()) R->slots.resize(1);
    if ((int)R->slots.size() < resident) R->slots.resize(resident);
    std::vector<int> running, idle;
    for (int k = resident - 1; k >= 0; --k) idle.push_back(k);
    uint64_t next = 0, turn = 0, rng = (uint64_t)L->seed ^ 0x5bd1e995ull;
    install_fault_handler();
    timer_t watchdog;
    const bool watched = arm_watchdog(&watchdog);
    for (;;) {
        while (!idle.empty() && next < nblocks) {
            const int k = idle.back();
            idle.pop_back();
            switch_to(k);
            if (!ensure_memory((int)nt, (size_t)L->shared_mem)) {
                L->error = CONFIG;
                set_message("cannot allocate fiber stacks: %s", strerror(errno));
                break;
            }
            const uint64_t i = L->shuffle ? order[next] : next;
            ++next;
            start_block(uint3{(unsigned)(i % L->grid[0]), (unsigned)((i / L->grid[0]) % L->grid[1]),
                              (unsigned)(i / ((uint64_t)L->grid[0] * L->grid[1]))});
            running.push_back(k);
        }
        if (L->error || running.empty()) break;
        // Without a seed the oldest running block goes on until it finishes or
        // hands over from a spin-wait (then the next one, in turn); with a seed
        // a random running block runs 1 to 8 rounds.
        const size_t pick = L->shuffle ? splitmix(rng) % running.size() : turn % running.size();
        const int quantum = L->shuffle ? 1 + (int)(splitmix(rng) % 8) : INT_MAX;
        switch_to(running[pick]);
        int r = 0;
        R->spun = false;
        for (int q = 0; q < quantum && r == 0 && !R->spun; ++q) r = run_round();
        if (r < 0) break;
        if (!L->shuffle && R->spun) ++turn;
        if (r == 1) {
            ++L->blocks_run;
            idle.push_back(running[pick]);
            running.erase(running.begin() + pick);
        }
    }
    if (watched) timer_delete(watchdog);
    restore_fault_handler();
    unstage_buffers(stages);
    release_slots();
    R->cur = nullptr;
    R->L = nullptr;
    return L->error;
}
