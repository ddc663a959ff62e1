// CPU ISA dispatch for the hot loops of every op family (one definition for all of them).
//
// THR_CLONES: the function is compiled twice, for x86-64-v3 (AVX2 + FMA) and baseline
// x86-64, and the loader picks the clone for the running CPU (GCC function multi-versioning),
// so the default build stays portable without giving up AVX2. THRESHER_NO_CLONES (or a
// non-x86 target) compiles a single version.
//
// THR_AI: force-inline. Everything a cloned function calls must be inlined into it, so that
// each clone gets its own AVX2 / baseline copy -- a non-inlined helper exists only in its
// baseline form (and a vector-typed one would cross the clone boundary with a different ABI).
#pragma once

#if defined(__x86_64__) && !defined(THRESHER_NO_CLONES)
#define THR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define THR_CLONES
#endif

#define THR_AI inline __attribute__((always_inline))
