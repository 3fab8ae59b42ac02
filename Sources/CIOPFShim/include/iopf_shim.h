// iopf_shim.h — the few Linux calls Swift cannot import: variadic or function-like macros.
// Each returns what the kernel returns: -1 with errno set on failure.
#ifndef IOPF_SHIM_H
#define IOPF_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <linux/userfaultfd.h>  // struct uffd_msg imports into Swift
#include <sys/eventfd.h>
#include <sys/types.h>

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

/// memfd_create(2) with MFD_CLOEXEC | MFD_ALLOW_SEALING.
int iopf_memfd_create_sealable(const char *name);

/// memfd_create(2) of 2 MiB hugetlbfs pages: MFD_HUGETLB | MFD_HUGE_2MB, sealable.
int iopf_memfd_create_huge(const char *name);

/// Hashes `pages` 4 KiB pages from `base` into `out` (one u64 each); not sanitized.
void iopf_hash_pages(const void *base, size_t pages, uint64_t *out);

/// fcntl(F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): the size can never change.
int iopf_seal_size(int fd);

/// fcntl(F_GET_SEALS) has F_SEAL_SHRINK and F_SEAL_GROW: 1 yes, 0 no, -1 error.
int iopf_size_is_sealed(int fd);

/// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): frees a file's pages (tests
/// show that it raises no userfaultfd event on mappings of the file).
int iopf_punch_hole(int fd, int64_t offset, int64_t length);

/// fcntl(F_GET_SEALS): the seals of a memfd, or -1.
int iopf_seals(int fd);

/// preadv2(RWF_NOWAIT) of one buffer: never blocks, whatever the file's O_NONBLOCK flag
/// (which another process sharing the file can change). -1 with EAGAIN when nothing is ready.
ssize_t iopf_read_nowait(int fd, void *buf, size_t len);

/// One VMA of another process, as PROCMAP_QUERY reports it.
struct iopf_vma {
    uint64_t start, end, offset, inode;
    uint32_t dev_major, dev_minor;
    int shared;
};

/// ioctl(PROCMAP_QUERY) on an open /proc/PID/maps (Linux 6.11+): the VMA covering
/// `address`, read atomically. -1 with ENOENT when none covers it, ENOTTY on older kernels.
int iopf_procmap_query(int maps_fd, uint64_t address, struct iopf_vma *vma);

/// sendmsg(2) of one message with up to `nfds` descriptors (SCM_RIGHTS), MSG_NOSIGNAL
/// and MSG_DONTWAIT when `nonblocking`. Returns bytes sent or -1.
ssize_t iopf_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int nonblocking);

/// recvmsg(2) of one message (MSG_CMSG_CLOEXEC, MSG_DONTWAIT when `nonblocking`). Stores
/// up to `max_fds` received descriptors in `fds` and their count in `*nfds`; descriptors
/// beyond `max_fds` are closed. `*truncated` is set when the message or its descriptors did
/// not fit (MSG_TRUNC / MSG_CTRUNC). Returns bytes received, 0 at end of stream, or -1.
ssize_t iopf_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds, int *truncated,
                           int nonblocking);

/// accept4(2) with SOCK_CLOEXEC | SOCK_NONBLOCK.
int iopf_accept(int sock);

/// SO_PEERCRED of a connected AF_UNIX socket.
int iopf_peer_credentials(int sock, int *pid, int *uid, int *gid);

/// The gettid(2) of the calling thread.
int iopf_gettid(void);

/// Restricts the calling thread to CPU `cpu` (`only` != 0) or to every online CPU but
/// `cpu` (`only` == 0). CPU_SET is a macro Swift cannot call. Returns 0 or -1 with errno.
int iopf_set_cpu_affinity(int cpu, int only);

/// sched_getcpu(3): the CPU the calling thread runs on now.
int iopf_current_cpu(void);
/// CPUs the calling thread may run on (its affinity mask): how many, and the highest in *last.
int iopf_allowed_cpus(int *last);
/* The calling thread runs only when no normal thread wants its CPU (SCHED_IDLE). */
int iopf_set_idle_priority(void);

// mlock(2) / munlock(2) as raw system calls: the sanitizer runtimes intercept the libc
// functions and make them no-ops, so under TSan/ASan nothing would really be pinned.
int iopf_mlock(const void *addr, size_t len);
int iopf_munlock(const void *addr, size_t len);

/// Touching host pages instead of asking the kernel (probe.c). Install once before the
/// first probe; it returns -1 if the signal handlers could not be installed.
int iopf_probe_install(void);
/// Touches the first word of each of `pages` pages from `address`: a load, or with
/// `write` a locked no-op write (write-fault semantics, no byte changed). With `fault_ns`
/// it stops after a page that took longer than that (it faulted): returns the pages
/// touched, all or fewer; -1 if a page raised SIGSEGV or SIGBUS (the caller asks the
/// kernel for the reason).
long iopf_probe_pages(const void *address, size_t pages, int write, uint64_t fault_ns);

#endif
