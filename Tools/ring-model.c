// Tools/ring-model.c — one fault in flight between two pinned threads, with nothing but
// the shared ring: v1's layout (40-byte request slots and a tail, 8-byte responses and a
// tail; mode 0) against slots that carry their own sequence mark (64-byte requests,
// 32-byte responses, no tails; mode 1). Measures a layout change before the protocol
// takes it (docs/benchmarks.md, "one in flight at the slow speed").
//
//   cc -O2 -pthread -o /tmp/ring-model Tools/ring-model.c && /tmp/ring-model 0 && /tmp/ring-model 1
//
// Prints the p50 and p99 of 200,000 round trips (clock reads included), threads on CPUs 0
// and 1; compare with `iopf floors`' "cache line to a CPU and back" taken alongside.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define N 256
static _Alignas(4096) unsigned char mem[4096 + N * 64 + N * 32];
#define U32(off) ((_Atomic uint32_t *)(mem + (off)))
static int mode, iters = 200000;
static uint64_t now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000ull + t.tv_nsec; }
static void pin(int c) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(c, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }
static void *service(void *arg) {
  pin(1);
  uint32_t head = 0, rtail = 0; unsigned char copy[40];
  for (int i = 0; i < iters; i++) {
    if (mode == 0) {
      while (atomic_load_explicit(U32(64), memory_order_acquire) == head) ;
      memcpy(copy, mem + 4096 + (head % N) * 40, 40); head++;
      atomic_store_explicit(U32(0), head, memory_order_release);
      unsigned char *r = mem + 4096 + N * 40 + (rtail % N) * 8;
      memcpy(r, copy + 36, 4); memset(r + 4, 0, 4); rtail++;
      atomic_store_explicit(U32(192), rtail, memory_order_seq_cst);
    } else {
      unsigned char *s = mem + 4096 + (head % N) * 64;
      while (atomic_load_explicit((_Atomic uint32_t *)(s + 40), memory_order_acquire) != head + 1) ;
      memcpy(copy, s, 40); head++;
      atomic_store_explicit(U32(0), head, memory_order_release);
      unsigned char *r = mem + 4096 + N * 64 + (rtail % N) * 32;
      memcpy(r, copy + 36, 4); memset(r + 4, 0, 4);
      atomic_store_explicit((_Atomic uint32_t *)(r + 8), rtail + 1, memory_order_seq_cst); rtail++;
    }
  }
  return 0;
}
static int cmp(const void *a, const void *b) { uint64_t x = *(uint64_t *)a, y = *(uint64_t *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
  mode = atoi(argv[1]);
  memset(mem, 0, sizeof mem);
  pthread_t t; pthread_create(&t, 0, service, 0);
  pin(0);
  uint64_t *lat = malloc(iters * 8); uint32_t tail = 0, rhead = 0;
  for (int i = 0; i < iters; i++) {
    uint64_t t0 = now();
    if (mode == 0) {
      unsigned char *s = mem + 4096 + (tail % N) * 40; memset(s, 0, 36); memcpy(s + 36, &i, 4); tail++;
      atomic_store_explicit(U32(64), tail, memory_order_seq_cst);
      while (atomic_load_explicit(U32(192), memory_order_acquire) == rhead) ;
      rhead++; atomic_store_explicit(U32(128), rhead, memory_order_release);
    } else {
      unsigned char *s = mem + 4096 + (tail % N) * 64; memset(s, 0, 36); memcpy(s + 36, &i, 4);
      atomic_store_explicit((_Atomic uint32_t *)(s + 40), tail + 1, memory_order_seq_cst); tail++;
      unsigned char *r = mem + 4096 + N * 64 + (rhead % N) * 32;
      while (atomic_load_explicit((_Atomic uint32_t *)(r + 8), memory_order_acquire) != rhead + 1) ;
      rhead++; atomic_store_explicit(U32(128), rhead, memory_order_release);
    }
    lat[i] = now() - t0;
  }
  pthread_join(t, 0);
  qsort(lat, iters, 8, cmp);
  printf("mode %d p50 %llu p99 %llu ns\n", mode, (unsigned long long)lat[iters / 2], (unsigned long long)lat[iters * 99 / 100]);
}
