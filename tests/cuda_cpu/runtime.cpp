// CUDA-on-CPU test runtime: the scheduler behind include/cuda_runtime.h (read its header comment for
// the execution model and its limits).
//
// A launch validates the configuration like a device, then hands the blocks (in a seeded permutation
// of the grid) to a pool of host threads. Each host thread runs one block at a time: the block's
// threads are fibers with their own 64 KiB stacks (guard page below), switched by a few
// instructions of assembly (x86-64) or ucontext elsewhere. The block scheduler resumes runnable
// fibers round-robin; a fiber gives control back when it waits at __syncthreads or at a warp
// collective, when it exits, or at a seeded random scheduling point (atomics). The last thread
// to arrive at a barrier or collective completes it and wakes the others. When no fiber can run but
// some have not exited, the block is deadlocked: the launch fails with a description.
// Standard headers first: cuda_runtime.h redefines __noinline__, which libstdc++ uses as an attribute.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <cuda_runtime.h>

#include "emulation_api.h"

namespace lc_cpu {

thread_local ThreadVars* current_thread = nullptr;
thread_local BlockVars current_block;

namespace {

// ------------------------------------------------------------------------------------------------
// configuration and statistics
// ------------------------------------------------------------------------------------------------

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

struct Config {
  int workers;
  uint64_t seed;
  double yield_probability;
};

Config& config() {
  static Config c{
      env_int("LESIONCOUNT_CUDA_CPU_WORKERS", static_cast<int>(std::max(2u, std::min(4u, std::thread::hardware_concurrency())))),
      static_cast<uint64_t>(env_int("LESIONCOUNT_CUDA_CPU_SEED", 1)),
      env_int("LESIONCOUNT_CUDA_CPU_YIELD_PERCENT", 10) / 100.0};
  return c;
}

std::atomic<long long> stat_launches{0}, stat_blocks{0}, stat_threads{0}, stat_switches{0};

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// ------------------------------------------------------------------------------------------------
// context switching
// ------------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// lc_cpu_switch(&save_sp, load_sp): pushes the callee-saved registers and the SSE/x87 control
// words, stores the stack pointer, loads the other one and pops its registers.
extern "C" void lc_cpu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type lc_cpu_switch,@function
lc_cpu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lc_cpu_switch,.-lc_cpu_switch
)");
#endif

constexpr size_t kStackBytes = 64 * 1024;

enum class State : int { kRunnable, kBarrier, kWarp, kExited };

struct Fiber {
  ThreadVars vars;
  unsigned linear = 0, lane = 0, warp = 0;
  State state = State::kRunnable;
  uint64_t result = 0;  // of the collective it waited at
  char* stack = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct PendingCollective {
  bool used = false;
  Collective kind;
  unsigned mask = 0, arrived = 0;
  int width = 32;
  uint64_t value[32];
  int arg[32];
};

struct Warp {
  unsigned existing = 0;  // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
  PendingCollective pending[32];
};

const char* collective_name(Collective k) {
  switch (k) {
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kShflUp: return "__shfl_up_sync";
    case Collective::kShflDown: return "__shfl_down_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kBallot: return "__ballot_sync";
    case Collective::kAny: return "__any_sync";
    case Collective::kAll: return "__all_sync";
    case Collective::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

// One launch, shared by the host threads that run its blocks.
struct Launch {
  dim3 grid, block;
  size_t smem_bytes;
  KernelEntry entry;
  void* context;
  long long total_blocks;
  long long order_stride, order_offset;  // block i runs as linear block (i * stride + offset) mod total
  uint64_t seed;
  std::atomic<long long> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
};

// Per host thread: the fibers and the block being run.
struct Worker {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  unsigned nthreads = 0;
  unsigned arrived = 0, exited = 0;  // barrier
  Fiber* current = nullptr;
  Launch* launch = nullptr;
  uint64_t rng = 0;
  bool aborted = false;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif

  ~Worker() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack - getpagesize(), kStackBytes + getpagesize());
  }
};

thread_local Worker* worker = nullptr;

void switch_to_scheduler() {
  Worker& w = *worker;
  stat_switches.fetch_add(1, std::memory_order_relaxed);
#if defined(__x86_64__)
  lc_cpu_switch(&w.current->sp, w.scheduler_sp);
#else
  swapcontext(&w.current->context, &w.scheduler_context);
#endif
}

std::string where(const Worker& w) {
  char buf[160];
  const BlockVars& b = current_block;
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u) of grid (%u, %u, %u), thread (%u, %u, %u) of (%u, %u, %u)",
                b.block_idx.x, b.block_idx.y, b.block_idx.z, b.grid_dim.x, b.grid_dim.y, b.grid_dim.z,
                w.current ? w.current->vars.thread_idx.x : 0, w.current ? w.current->vars.thread_idx.y : 0,
                w.current ? w.current->vars.thread_idx.z : 0, b.block_dim.x, b.block_dim.y, b.block_dim.z);
  return buf;
}

void record_error(Launch& l, const std::string& message) {
  std::lock_guard<std::mutex> lock(l.error_mutex);
  if (!l.failed.load()) {
    l.error = message;
    l.failed.store(true);
  }
}

// Reports a kernel error from inside a fiber and never returns to the kernel.
[[noreturn]] void fail(const char* fmt, ...) {
  Worker& w = *worker;
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  record_error(*w.launch, std::string("kernel error in ") + where(w) + ": " + buf);
  w.aborted = true;
  w.current->state = State::kExited;
  for (;;) switch_to_scheduler();
}

void release_barrier(Worker& w) {
  for (unsigned i = 0; i < w.nthreads; ++i)
    if (w.fibers[i].state == State::kBarrier) w.fibers[i].state = State::kRunnable;
  w.arrived = 0;
}

void on_exit(Worker& w, Fiber& f) {
  ++w.exited;
  Warp& warp = w.warps[f.warp];
  warp.exited |= 1u << f.lane;
  for (PendingCollective& p : warp.pending)
    if (p.used && (p.mask >> f.lane & 1u) && !(p.arrived >> f.lane & 1u))
      fail("exits while lanes 0x%08x of warp %u wait for it at %s (mask 0x%08x)", p.arrived, f.warp,
           collective_name(p.kind), p.mask);
  if (w.arrived > 0 && w.arrived + w.exited == w.nthreads) release_barrier(w);
}

[[noreturn]] void fiber_main() {
  Worker& w = *worker;
  w.launch->entry(w.launch->context);
  Fiber& f = *w.current;
  on_exit(w, f);
  f.state = State::kExited;
  for (;;) switch_to_scheduler();
}

#if !defined(__x86_64__)
void fiber_main_ucontext() { fiber_main(); }
#endif

void prepare_fiber(Worker& w, Fiber& f) {
  if (!f.stack) {
    const size_t page = static_cast<size_t>(getpagesize());
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "lesioncount CUDA-on-CPU runtime: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f.stack = static_cast<char*>(mem) + page;
  }
#if defined(__SANITIZE_ADDRESS__)
  // A reused stack may still carry the shadow poisoning of an abandoned fiber's frames.
  ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
#if defined(__x86_64__)
  // Initial frame popped by lc_cpu_switch: control words, six registers, then "return" into
  // fiber_main with the stack aligned as after a call (rsp = 8 mod 16 at entry).
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                           // fake return address of fiber_main
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);     // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;               // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr = 0x1f80;
  uint16_t fpucw = 0x037f;
  uint64_t cw = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  *--sp = cw;
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, fiber_main_ucontext, 0);
#endif
  (void)w;
}

void resume(Worker& w, Fiber& f) {
  w.current = &f;
  current_thread = &f.vars;
  stat_switches.fetch_add(1, std::memory_order_relaxed);
#if defined(__x86_64__)
  lc_cpu_switch(&w.scheduler_sp, f.sp);
#else
  swapcontext(&w.scheduler_context, &f.context);
#endif
  w.current = nullptr;
  current_thread = nullptr;
}

std::string deadlock_report(const Worker& w) {
  unsigned at_barrier = 0, at_warp = 0;
  std::string detail;
  for (unsigned i = 0; i < w.nthreads; ++i) {
    if (w.fibers[i].state == State::kBarrier) ++at_barrier;
    if (w.fibers[i].state == State::kWarp) ++at_warp;
  }
  for (size_t wi = 0; wi < w.warps.size() && detail.size() < 300; ++wi)
    for (const PendingCollective& p : w.warps[wi].pending)
      if (p.used) {
        char buf[128];
        std::snprintf(buf, sizeof buf, "; warp %zu: %s mask 0x%08x, arrived 0x%08x", wi, collective_name(p.kind), p.mask,
                      p.arrived);
        detail += buf;
      }
  char head[200];
  const BlockVars& b = current_block;
  std::snprintf(head, sizeof head,
                "kernel deadlock in block (%u, %u, %u): %u threads wait at __syncthreads, %u at warp collectives, "
                "%u exited",
                b.block_idx.x, b.block_idx.y, b.block_idx.z, at_barrier, at_warp, w.exited);
  return head + detail;
}

void run_block(Worker& w, long long linear_block) {
  Launch& l = *w.launch;
  const long long gx = l.grid.x, gy = l.grid.y;
  current_block.block_idx = uint3{static_cast<unsigned>(linear_block % gx), static_cast<unsigned>((linear_block / gx) % gy),
                                  static_cast<unsigned>(linear_block / (gx * gy))};
  current_block.block_dim = l.block;
  current_block.grid_dim = l.grid;
  if (!w.smem.empty()) std::memset(w.smem.data(), 0xff, w.smem.size());
  w.arrived = w.exited = 0;
  w.aborted = false;
  for (Warp& wp : w.warps) {
    wp.exited = 0;
    for (PendingCollective& p : wp.pending) p.used = false;
  }
  for (unsigned i = 0; i < w.nthreads; ++i) {
    w.fibers[i].state = State::kRunnable;
    prepare_fiber(w, w.fibers[i]);
  }
  unsigned start = 0;
  while (w.exited < w.nthreads && !w.aborted) {
    bool ran = false;
    for (unsigned k = 0; k < w.nthreads && !w.aborted; ++k) {
      Fiber& f = w.fibers[(start + k) % w.nthreads];
      if (f.state != State::kRunnable) continue;
      ran = true;
      resume(w, f);
    }
    if (!ran && w.exited < w.nthreads && !w.aborted) {
      record_error(l, deadlock_report(w));
      w.aborted = true;
    }
    start = static_cast<unsigned>(splitmix(w.rng) % w.nthreads);
  }
}

void run_worker(Launch& l, int worker_index) {
  Worker*& slot = worker;
  static thread_local Worker storage;
  slot = &storage;
  Worker& w = storage;
  w.launch = &l;
  w.rng = l.seed * 0x100000001b3ull + static_cast<uint64_t>(worker_index) * 0x9e3779b97f4a7c15ull + 1;
  w.nthreads = l.block.x * l.block.y * l.block.z;
  if (w.fibers.size() < w.nthreads) w.fibers.resize(w.nthreads);
  const unsigned nwarps = (w.nthreads + 31) / 32;
  w.warps.assign(nwarps, Warp{});
  for (unsigned i = 0; i < w.nthreads; ++i) {
    Fiber& f = w.fibers[i];
    f.linear = i;
    f.lane = i % 32;
    f.warp = i / 32;
    f.vars.thread_idx = uint3{i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
    w.warps[f.warp].existing |= 1u << f.lane;
  }
  w.smem.assign(l.smem_bytes, 0xff);
  long long blocks = 0;
  for (;;) {
    if (l.failed.load(std::memory_order_relaxed)) break;
    const long long i = l.next_block.fetch_add(1);
    if (i >= l.total_blocks) break;
    const long long linear = static_cast<long long>(
        (static_cast<unsigned __int128>(i) * static_cast<unsigned long long>(l.order_stride) + l.order_offset) %
        static_cast<unsigned long long>(l.total_blocks));
    run_block(w, linear);
    ++blocks;
  }
  stat_blocks.fetch_add(blocks);
  stat_threads.fetch_add(blocks * w.nthreads);
  w.launch = nullptr;
  slot = nullptr;
}

// ------------------------------------------------------------------------------------------------
// host thread pool
// ------------------------------------------------------------------------------------------------

class Pool {
 public:
  void run(int n, const std::function<void(int)>& job) {
    while (static_cast<int>(threads_) < n - 1) {
      std::thread(&Pool::loop, this, static_cast<int>(threads_)).detach();
      ++threads_;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = &job;
      wanted_ = n - 1;
      pending_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= wanted_) continue;
        job = job_;
      }
      (*job)(id + 1);
      std::lock_guard<std::mutex> lock(m_);
      if (--pending_ == 0) done_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable cv_, done_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int wanted_ = 0, pending_ = 0;
  unsigned threads_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its detached threads outlive static destruction
  return *p;
}

std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local cudaError_t last_message_code = cudaSuccess;  // the error last_error_message describes
thread_local std::string last_error_message;

cudaError_t set_error(cudaError_t e, const std::string& message) {
  last_error = e;
  last_message_code = e;
  last_error_message = message;
  return e;
}

long long gcd(long long a, long long b) {
  while (b) {
    const long long t = a % b;
    a = b;
    b = t;
  }
  return a;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// device-side entry points
// ------------------------------------------------------------------------------------------------

void syncthreads() {
  Worker& w = *worker;
  Fiber& f = *w.current;
  ++w.arrived;
  if (w.arrived + w.exited == w.nthreads) {
    release_barrier(w);
    scheduling_point();
    return;
  }
  f.state = State::kBarrier;
  switch_to_scheduler();
}

void scheduling_point() {
  Worker* w = worker;
  if (!w || !w->current) return;
  const double p = config().yield_probability;
  if (p <= 0) return;
  if (static_cast<double>(splitmix(w->rng) >> 11) * (1.0 / 9007199254740992.0) < p) switch_to_scheduler();
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int arg, int width) {
  Worker& w = *worker;
  Fiber& f = *w.current;
  Warp& warp = w.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  if (!(mask & bit)) fail("%s with mask 0x%08x that does not include the calling lane %u", collective_name(kind), mask, f.lane);
  if (mask & ~warp.existing)
    fail("%s mask 0x%08x names lanes that do not exist (warp lanes 0x%08x)", collective_name(kind), mask, warp.existing);
  if (mask & warp.exited)
    fail("%s mask 0x%08x names lanes that have exited (0x%08x)", collective_name(kind), mask, mask & warp.exited);
  if (kind <= Collective::kShflXor && (width <= 0 || width > 32 || (width & (width - 1)) != 0))
    fail("%s width %d is not a power of two in [1, 32]", collective_name(kind), width);
  PendingCollective* op = nullptr;
  for (PendingCollective& p : warp.pending) {
    if (!p.used) continue;
    if (p.mask == mask && !(p.arrived & bit)) {
      op = &p;
      break;
    }
    if ((p.mask & mask) && p.mask != mask)
      fail("%s with mask 0x%08x while lanes 0x%08x wait at %s with mask 0x%08x", collective_name(kind), mask, p.arrived,
           collective_name(p.kind), p.mask);
  }
  if (!op) {
    for (PendingCollective& p : warp.pending)
      if (!p.used) {
        op = &p;
        break;
      }
    op->used = true;
    op->kind = kind;
    op->mask = mask;
    op->arrived = 0;
    op->width = width;
  } else if (op->kind != kind || op->width != width) {
    fail("%s (width %d) meets %s (width %d) of lanes 0x%08x: divergent warp collectives", collective_name(kind), width,
         collective_name(op->kind), op->width, op->arrived);
  }
  op->value[f.lane] = value;
  op->arg[f.lane] = arg;
  op->arrived |= bit;
  if (op->arrived != mask) {
    f.state = State::kWarp;
    switch_to_scheduler();
    return f.result;
  }
  // Complete: compute every lane's result and wake the waiting lanes.
  const unsigned warp_base = f.warp * 32;
  unsigned predicate_bits = 0;
  for (unsigned lane = 0; lane < 32; ++lane)
    if ((mask >> lane & 1u) && op->value[lane]) predicate_bits |= 1u << lane;
  uint64_t own = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    uint64_t r = 0;
    const int wd = op->width;
    const int seg_lo = static_cast<int>(lane) / wd * wd, seg_hi = seg_lo + wd;
    int src = -1;
    switch (op->kind) {
      case Collective::kShflIdx: src = seg_lo + ((op->arg[lane] % wd) + wd) % wd; break;
      case Collective::kShflUp: src = static_cast<int>(lane) - op->arg[lane]; if (src < seg_lo) src = lane; break;
      case Collective::kShflDown: src = static_cast<int>(lane) + op->arg[lane]; if (src >= seg_hi) src = lane; break;
      case Collective::kShflXor: src = static_cast<int>(lane) ^ op->arg[lane]; if (src >= seg_hi || src < 0 || src > 31) src = lane; break;
      case Collective::kBallot: r = predicate_bits; break;
      case Collective::kAny: r = predicate_bits != 0; break;
      case Collective::kAll: r = predicate_bits == mask; break;
      case Collective::kSyncWarp: break;
    }
    if (op->kind <= Collective::kShflXor) {
      if (!(mask >> src & 1u)) {
        op->used = false;
        fail("%s: lane %u reads lane %d, which is not in mask 0x%08x", collective_name(op->kind), lane, src, mask);
      }
      r = op->value[src];
    }
    if (lane == f.lane) {
      own = r;
    } else {
      Fiber& other = w.fibers[warp_base + lane];
      other.result = r;
      other.state = State::kRunnable;
    }
  }
  op->used = false;
  return own;
}

void* dynamic_shared_memory() {
  Worker* w = worker;
  return w && !w->smem.empty() ? w->smem.data() : nullptr;
}

cudaError_t launch_erased(dim3 grid, dim3 block, size_t smem_bytes, KernelEntry entry, void* context) {
  char buf[200];
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024) {
    std::snprintf(buf, sizeof buf, "invalid configuration argument: grid (%u, %u, %u), block (%u, %u, %u)", grid.x,
                  grid.y, grid.z, block.x, block.y, block.z);
    return set_error(cudaErrorInvalidConfiguration, buf);
  }
  if (smem_bytes > 48 * 1024) {
    std::snprintf(buf, sizeof buf, "invalid argument: %zu bytes of dynamic shared memory (> 48 KiB without an opt-in)",
                  smem_bytes);
    return set_error(cudaErrorInvalidValue, buf);
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  Launch l;
  l.grid = grid;
  l.block = block;
  l.smem_bytes = smem_bytes;
  l.entry = entry;
  l.context = context;
  l.total_blocks = 1ll * grid.x * grid.y * grid.z;
  const Config& c = config();
  uint64_t s = c.seed * 0x2545f4914f6cdd1dull + static_cast<uint64_t>(stat_launches.fetch_add(1));
  l.seed = splitmix(s);
  l.order_offset = static_cast<long long>(splitmix(s) % static_cast<uint64_t>(l.total_blocks));
  long long stride = static_cast<long long>(splitmix(s) % static_cast<uint64_t>(l.total_blocks)) | 1;
  while (gcd(stride, l.total_blocks) != 1) stride += 2;  // a permutation of the blocks
  l.order_stride = stride % l.total_blocks == 0 ? 1 : stride;
  const int n = static_cast<int>(std::max<long long>(1, std::min<long long>(c.workers, l.total_blocks)));
  const std::function<void(int)> job = [&](int index) { run_worker(l, index); };
  pool().run(n, job);
  if (l.failed.load()) return set_error(cudaErrorLaunchFailure, l.error);
  return cudaSuccess;
}

void configure(int workers, long long seed, double yield_probability) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  Config& c = config();
  if (workers > 0) c.workers = workers;
  if (seed >= 0) c.seed = static_cast<uint64_t>(seed);
  if (yield_probability >= 0) c.yield_probability = yield_probability;
}

namespace {
std::atomic<bool> large_item_paths{false};
}
bool force_large_item_paths() { return large_item_paths.load(std::memory_order_relaxed); }
void set_force_large_item_paths(bool on) { large_item_paths.store(on); }

Stats stats() {
  return Stats{stat_launches.load(), stat_blocks.load(), stat_threads.load(), stat_switches.load(), config().workers,
               static_cast<long long>(config().seed), config().yield_probability};
}

}  // namespace lc_cpu

// ------------------------------------------------------------------------------------------------
// host runtime API
// ------------------------------------------------------------------------------------------------

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (bytes == 0) return cudaSuccess;
  if (!ptr) return lc_cpu::set_error(cudaErrorInvalidValue, "invalid argument: cudaMemsetAsync on a null pointer");
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = lc_cpu::last_error;
  lc_cpu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return lc_cpu::last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchFailure:
      if (lc_cpu::last_message_code == error) {  // the detailed message, once
        lc_cpu::last_message_code = cudaSuccess;
        return lc_cpu::last_error_message.c_str();
      }
      return error == cudaErrorInvalidValue ? "invalid argument"
                                            : (error == cudaErrorLaunchFailure ? "unspecified launch failure"
                                                                               : "invalid configuration argument");
  }
  return "unknown error";
}
