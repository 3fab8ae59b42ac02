// shim.c — thin wrappers; no logic lives here.
#define _GNU_SOURCE
#include "iopf_shim.h"
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int iopf_pipe2(int fds[2], int flags) { return pipe2(fds, O_CLOEXEC | flags); }

void *iopf_mremap(void *old_address, size_t old_size, size_t new_size, void *new_address) {
    if (new_address)
        return mremap(old_address, old_size, new_size, MREMAP_MAYMOVE | MREMAP_FIXED, new_address);
    return mremap(old_address, old_size, new_size, MREMAP_MAYMOVE);
}

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
void *iopf_mremap_dontunmap(void *old_address, size_t size, void *new_address) {
    return mremap(old_address, size, size, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, new_address);
}

int iopf_userfaultfd(int flags) { return (int)syscall(SYS_userfaultfd, flags); }

int iopf_uffd_api(int uffd, uint64_t wanted_features, uint64_t *granted_features, uint64_t *ioctls) {
    struct uffdio_api api = {.api = UFFD_API, .features = wanted_features};
    int r = ioctl(uffd, UFFDIO_API, &api);
    if (r == 0) {
        *granted_features = api.features;
        *ioctls = api.ioctls;
    }
    return r;
}

int iopf_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode) {
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    return ioctl(uffd, UFFDIO_REGISTER, &reg);
}

int iopf_uffd_unregister(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(uffd, UFFDIO_UNREGISTER, &range);
}

int iopf_uffd_zeropage(int uffd, uint64_t start, uint64_t len) {
    struct uffdio_zeropage z = {.range = {.start = start, .len = len}, .mode = 0};
    return ioctl(uffd, UFFDIO_ZEROPAGE, &z);
}

uint64_t iopf_uffd_mode_missing(void) { return UFFDIO_REGISTER_MODE_MISSING; }
uint32_t iopf_uffd_event_pagefault(void) { return UFFD_EVENT_PAGEFAULT; }

int iopf_memfd_create(const char *name) { return memfd_create(name, MFD_CLOEXEC); }

int iopf_gettid(void) { return (int)syscall(SYS_gettid); }
