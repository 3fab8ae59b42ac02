// shim.c — thin wrappers; no logic lives here.
#define _GNU_SOURCE
#include "iopf_shim.h"
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/fs.h>
#include <string.h>
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

int iopf_set_cpu_affinity(int cpu, int only) {
    cpu_set_t set;
    CPU_ZERO(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpu < 0 || cpu >= CPU_SETSIZE || n < 1) { errno = EINVAL; return -1; }
    if (only) {
        CPU_SET(cpu, &set);
    } else {
        for (long i = 0; i < n && i < CPU_SETSIZE; i++) if (i != cpu) CPU_SET(i, &set);
        if (CPU_COUNT(&set) == 0) { errno = EINVAL; return -1; }
    }
    return sched_setaffinity(0, sizeof set, &set);
}

int iopf_current_cpu(void) { return sched_getcpu(); }

int iopf_allowed_cpus(int *last) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    *last = -1;
    for (int i = 0; i < CPU_SETSIZE; i++) if (CPU_ISSET(i, &set)) *last = i;
    return CPU_COUNT(&set);
}

int iopf_set_idle_priority(void) {
    struct sched_param p = { .sched_priority = 0 };
    return sched_setscheduler(0, SCHED_IDLE, &p);
}

int iopf_memfd_create_sealable(const char *name) { return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING); }

int iopf_memfd_create_huge(const char *name) {
    return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB | (21u << 26) /* MFD_HUGE_2MB */);
}

int iopf_seal_size(int fd) { return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL); }

int iopf_size_is_sealed(int fd) {
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0) return -1;
    return (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) == (F_SEAL_SHRINK | F_SEAL_GROW);
}

#define IOPF_MAX_FDS 16

ssize_t iopf_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int nonblocking) {
    if (nfds < 0 || nfds > IOPF_MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * IOPF_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL | (nonblocking ? MSG_DONTWAIT : 0));
}

ssize_t iopf_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds, int *truncated,
                           int nonblocking) {
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * IOPF_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof(control.buf)};
    *nfds = 0;
    *truncated = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | (nonblocking ? MSG_DONTWAIT : 0));
    if (n < 0) return n;
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) *truncated = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *received = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, received + i, sizeof(int));
            if (*nfds < max_fds) fds[(*nfds)++] = fd;
            else { close(fd); *truncated = 1; }
        }
    }
    return n;
}

int iopf_peer_credentials(int sock, int *pid, int *uid, int *gid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
    *pid = cred.pid;
    *uid = (int)cred.uid;
    *gid = (int)cred.gid;
    return 0;
}

int iopf_accept(int sock) { return accept4(sock, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK); }

int iopf_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int iopf_seals(int fd) { return fcntl(fd, F_GET_SEALS); }

ssize_t iopf_read_nowait(int fd, void *buf, size_t len) {
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    return preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
}

/* PROCMAP_QUERY (Linux 6.11, include/uapi/linux/fs.h); the 6.1 headers lack it. */
struct iopf_procmap_query {
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define IOPF_PROCMAP_QUERY _IOWR('f', 17, struct iopf_procmap_query)

int iopf_procmap_query(int maps_fd, uint64_t address, struct iopf_vma *vma) {
    struct iopf_procmap_query q;
    memset(&q, 0, sizeof q);
    q.size = sizeof q;
    q.query_addr = address;
    if (ioctl(maps_fd, IOPF_PROCMAP_QUERY, &q) != 0) return -1;
    vma->start = q.vma_start;
    vma->end = q.vma_end;
    vma->offset = q.vma_offset;
    vma->inode = q.inode;
    vma->dev_major = q.dev_major;
    vma->dev_minor = q.dev_minor;
    vma->shared = (q.vma_flags & 0x08) != 0;
    return 0;
}

int iopf_mlock(const void *addr, size_t len) { return (int)syscall(SYS_mlock, addr, len); }

int iopf_munlock(const void *addr, size_t len) { return (int)syscall(SYS_munlock, addr, len); }

/* Page hashes for `iopf host --dirty-log`'s scan of its memory: four multiply-xor lanes
 * per page. Not instrumented by sanitizers: devices in other processes write these pages,
 * which no sanitizer of this process sees, and the scan of a GiB must stay cheap. */
__attribute__((no_sanitize("thread", "address")))
void iopf_hash_pages(const void *base, size_t pages, uint64_t *out) {
    const uint64_t k = 0x9E3779B97F4A7C15ull;
    for (size_t p = 0; p < pages; p++) {
        const uint64_t *w = (const uint64_t *)((const char *)base + (p << 12));
        uint64_t a = 1, b = 2, c = 3, d = 4;
        for (int i = 0; i < 512; i += 4) {
            a = (a ^ w[i]) * k;
            b = (b ^ w[i + 1]) * k;
            c = (c ^ w[i + 2]) * k;
            d = (d ^ w[i + 3]) * k;
        }
        out[p] = a ^ (b << 1 | b >> 63) ^ (c << 2 | c >> 62) ^ (d << 3 | d >> 61);
    }
}
