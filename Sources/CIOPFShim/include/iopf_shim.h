// iopf_shim.h — the few Linux calls Swift cannot import: variadic or function-like macros.
// Each returns what the kernel returns: -1 with errno set on failure.
#ifndef IOPF_SHIM_H
#define IOPF_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <linux/userfaultfd.h>  // struct uffd_msg imports into Swift

/// pipe2(2) with O_CLOEXEC | extra flags.
int iopf_pipe2(int fds[2], int flags);

/// mremap(2) with MREMAP_MAYMOVE (| MREMAP_FIXED when new_address is not NULL).
void *iopf_mremap(void *old_address, size_t old_size, size_t new_size, void *new_address);

/// mremap(2) with MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP (Linux 5.7+): moves the
/// pages to new_address and leaves the old range mapped and empty.
void *iopf_mremap_dontunmap(void *old_address, size_t size, void *new_address);

/// userfaultfd(2) through syscall(2): Swift cannot call variadic syscall().
int iopf_userfaultfd(int flags);

/// UFFDIO_API: negotiates features; returns 0 and stores the granted features and ioctls.
int iopf_uffd_api(int uffd, uint64_t wanted_features, uint64_t *granted_features, uint64_t *ioctls);

/// UFFDIO_REGISTER in missing mode over [start, start + len).
int iopf_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode);

/// UFFDIO_UNREGISTER over [start, start + len).
int iopf_uffd_unregister(int uffd, uint64_t start, uint64_t len);

/// UFFDIO_ZEROPAGE over [start, start + len): resolves a missing fault with zeros.
int iopf_uffd_zeropage(int uffd, uint64_t start, uint64_t len);

/// The register mode and event constants, which are macros.
uint64_t iopf_uffd_mode_missing(void);
uint32_t iopf_uffd_event_pagefault(void);

/// memfd_create(2) with MFD_CLOEXEC.
int iopf_memfd_create(const char *name);

/// The gettid(2) of the calling thread.
int iopf_gettid(void);

#endif
