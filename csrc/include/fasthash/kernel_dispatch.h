// Instantiates a kernel template for every (query block, width, mask) combination and picks one
// at run time. Included by each per-ISA file after its target pragma, inside a factory function
// whose kernels live in an anonymous namespace, so every instantiation is private to its ISA's
// translation unit.
#pragma once

// KERNEL must name a template <int QB, int W, bool MASK> void f(const KernelArgs&) (or
// f(const DistArgs&)); the macros stay defined, so a second factory in the same file just
// redefines KERNEL and expands FASTHASH_PICK_KERNEL() again.
#define FASTHASH_PICK_W(QB, MASK)                       \
  switch (W) {                                          \
    case 1: return &KERNEL<QB, 1, MASK>;                \
    case 2: return &KERNEL<QB, 2, MASK>;                \
    case 4: return &KERNEL<QB, 4, MASK>;                \
    case 8: return &KERNEL<QB, 8, MASK>;                \
    default: return &KERNEL<QB, 0, MASK>;               \
  }
#define FASTHASH_PICK_QB(MASK)                          \
  switch (nq) {                                         \
    case 1: FASTHASH_PICK_W(1, MASK)                    \
    case 2: FASTHASH_PICK_W(2, MASK)                    \
    case 4: FASTHASH_PICK_W(4, MASK)                    \
    default: FASTHASH_PICK_W(8, MASK)                   \
  }
#define FASTHASH_PICK_KERNEL()                          \
  if (masked) {                                         \
    FASTHASH_PICK_QB(true)                              \
  } else {                                              \
    FASTHASH_PICK_QB(false)                             \
  }
