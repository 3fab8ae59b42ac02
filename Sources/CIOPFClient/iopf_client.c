/* iopf_client.c — the iopf protocol from the device side (1.0) and the host side (1.1), in C (see
 * iopf_client.h and Sources/IOPFWire/IOPFWire.docc/Protocol.md). Everything the service
 * sends is checked before use: header size against what was received, reply ids and
 * commands, counts against payload sizes, descriptor counts against the payload. */
#define _GNU_SOURCE
#include "iopf_client.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { CMD_HELLO = 1, CMD_ATTACH = 2, CMD_TRANSLATE = 3, CMD_DETACH = 4, CMD_INVALIDATE = 5 };
enum { CMD_HOST = 6, CMD_DMA_MAP = 7, CMD_DMA_UNMAP = 8, CMD_SYNC = 9 };
enum { CMD_DIRTY_START = 11, CMD_DIRTY_STOP = 12, CMD_DIRTY_READ = 13 };
enum { FLAG_REPLY = 1, FLAG_ERROR = 1 << 5 };
enum { HEADER = 16, MAX_MESSAGE = 16384, MAX_FDS = 16, RECORD = 40 };

static int fail(struct iopf_client *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof(c->error), fmt, ap);
    va_end(ap);
    return -1;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

static void header(uint8_t *m, uint16_t id, uint16_t cmd, uint32_t size, uint32_t flags) {
    put16(m, id);
    put16(m + 2, cmd);
    put32(m + 4, size);
    put32(m + 8, flags);
    put32(m + 12, 0);
}

static void close_fds(const int *fds, int n) {
    for (int i = 0; i < n; i++) close(fds[i]);
}

/* One message with its descriptors; 0 bytes means the peer closed. */
static ssize_t receive(int fd, uint8_t *buf, size_t cap, int *fds, int *nfds) {
    struct iovec iov = {.iov_base = buf, .iov_len = cap};
    union {
        char b[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.b, .msg_controllen = sizeof(control.b)};
    *nfds = 0;
    ssize_t n;
    do n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC); while (n < 0 && errno == EINTR);
    if (n < 0) return n;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&msg); h; h = CMSG_NXTHDR(&msg, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(h) + i * sizeof(int), sizeof(int));
            if (fds && *nfds < MAX_FDS) fds[(*nfds)++] = got;
            else close(got);
        }
    }
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        if (fds) close_fds(fds, *nfds);
        *nfds = 0;
        errno = EMSGSIZE;
        return -1;
    }
    return n;
}

static int send_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Answers one INVALIDATE message (already received). */
static int answer_invalidation(struct iopf_client *c, const uint8_t *m, ssize_t n) {
    if (n < HEADER + 24 || get32(m + 4) != (uint32_t)n || get16(m + 2) != CMD_INVALIDATE || (get32(m + 8) & 0xF) != 0)
        return fail(c, "the service sent a malformed INVALIDATE");
    const uint8_t *p = m + HEADER;
    uint64_t sequence = get64(p);
    uint32_t count = get32(p + 16);
    if (count < 1 || count > 256 || (ssize_t)(HEADER + 24 + 16 * count) != n)
        return fail(c, "INVALIDATE with %u ranges in %zd bytes", count, n);
    struct iopf_range ranges[256];
    for (uint32_t i = 0; i < count; i++) {
        ranges[i].start = get64(p + 24 + 16 * i);
        ranges[i].last = get64(p + 32 + 16 * i);
    }
    /* Drop the translations (and drain DMA) first, then acknowledge. */
    if (sequence > c->invalidation_sequence) c->invalidation_sequence = sequence;
    if (c->on_invalidate) c->on_invalidate(c, ranges, (int)count, c->on_invalidate_ctx);
    uint8_t ack[HEADER + 8];
    header(ack, get16(m), CMD_INVALIDATE, sizeof(ack), FLAG_REPLY);
    put64(ack + HEADER, sequence);
    if (send_all(c->invalidation, ack, sizeof(ack)) != 0) return fail(c, "acknowledging INVALIDATE %llu: %s",
                                                                      (unsigned long long)sequence, strerror(errno));
    c->invalidations_acked++;
    return 0;
}

int iopf_poll_invalidations(struct iopf_client *c, int timeout_ms) {
    int answered = 0;
    uint8_t m[MAX_MESSAGE];
    for (;;) {
        struct pollfd p = {.fd = c->invalidation, .events = POLLIN};
        int r = poll(&p, 1, answered ? 0 : timeout_ms);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return fail(c, "poll: %s", strerror(errno));
        if (r == 0) return answered;
        ssize_t n = receive(c->invalidation, m, sizeof(m), NULL, &(int){0});
        if (n <= 0) return fail(c, "the service closed the invalidation socket");
        if (answer_invalidation(c, m, n) != 0) return -1;
        answered++;
    }
}

/* Waits until `fd` is readable, answering invalidations meanwhile. */
/* Waits until `fd` is readable, answering INVALIDATEs meanwhile: 1 when readable, 0 when
 * timeout_ms (-1: none) passed, -1 on error. */
static int wait_readable_for(struct iopf_client *c, int fd, int timeout_ms) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int left = timeout_ms;
        if (timeout_ms > 0) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long spent = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
            left = spent >= timeout_ms ? 0 : timeout_ms - (int)spent;
        }
        struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = c->invalidation, .events = POLLIN}};
        int n = c->invalidation >= 0 ? 2 : 1;
        int r = poll(p, (nfds_t)n, left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return fail(c, "poll: %s", strerror(errno));
        /* The reply first: after DETACH the service replies, then closes the invalidation
         * socket, and that end of stream is no error once the reply is here. */
        if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) return 1;
        if (n == 2 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)) && iopf_poll_invalidations(c, 0) < 0) return -1;
        if (r == 0) return 0;
    }
}

static int wait_readable(struct iopf_client *c, int fd) { return wait_readable_for(c, fd, -1) < 0 ? -1 : 0; }

/* One whole message with `nfds` descriptors attached (SCM_RIGHTS). */
static int send_with_fds(int fd, const uint8_t *buf, size_t len, const int *fds, int nfds) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char b[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        msg.msg_control = control.b;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *h = CMSG_FIRSTHDR(&msg);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(h), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do n = sendmsg(fd, &msg, MSG_NOSIGNAL); while (n < 0 && errno == EINTR);
    if (n < 0) return -1;
    if ((size_t)n != len) {
        errno = EMSGSIZE;
        return -1;
    }
    return 0;
}

/* Sends a request, with `send_fds` attached, on the control socket and receives its reply
 * (payload into out). */
static int request_fds(struct iopf_client *c, uint16_t cmd, const uint8_t *payload, size_t len, const int *send_fds,
                       int send_nfds, uint8_t *out, size_t cap, size_t *out_len, int *fds, int *nfds) {
    uint8_t m[MAX_MESSAGE];
    if (HEADER + len > sizeof(m)) return fail(c, "request too large");
    uint16_t id = ++c->next_id;
    header(m, id, cmd, (uint32_t)(HEADER + len), 0);
    if (len) memcpy(m + HEADER, payload, len);
    if (send_with_fds(c->control, m, HEADER + len, send_fds, send_nfds) != 0) return fail(c, "send: %s", strerror(errno));
    if (wait_readable(c, c->control) != 0) return -1;
    int got_fds = 0;
    ssize_t n = receive(c->control, m, sizeof(m), fds, &got_fds);
    if (nfds) *nfds = got_fds;
    if (n == 0) return fail(c, "the service closed the connection");
    if (n < HEADER || get32(m + 4) != (uint32_t)n) {
        if (fds) close_fds(fds, got_fds);
        return fail(c, "malformed reply (%zd bytes)", n);
    }
    uint32_t flags = get32(m + 8);
    if ((flags & FLAG_REPLY) == 0 || get16(m) != id || get16(m + 2) != cmd) {
        if (fds) close_fds(fds, got_fds);
        return fail(c, "expected the reply to command %u #%u", cmd, id);
    }
    if (flags & FLAG_ERROR) {
        if (fds) close_fds(fds, got_fds);
        return fail(c, "refused (errno %u): %.*s", get32(m + 12), (int)(n - HEADER), (const char *)m + HEADER);
    }
    if ((size_t)(n - HEADER) > cap) return fail(c, "reply larger than expected");
    memcpy(out, m + HEADER, (size_t)(n - HEADER));
    *out_len = (size_t)(n - HEADER);
    return 0;
}

/* A request without descriptors. */
static int request(struct iopf_client *c, uint16_t cmd, const uint8_t *payload, size_t len, uint8_t *out, size_t cap,
                   size_t *out_len, int *fds, int *nfds) {
    return request_fds(c, cmd, payload, len, NULL, 0, out, cap, out_len, fds, nfds);
}

/* Connects to the service's socket and says HELLO: version 1.`minor`, `capabilities`,
 * `role` (0 device, 1 host). */
static int connect_and_hello(struct iopf_client *c, const char *path, uint16_t minor, uint16_t min_minor,
                             uint32_t capabilities, uint32_t role) {
    memset(c, 0, sizeof(*c));
    c->control = c->invalidation = c->channel = -1;
    c->pasid = -1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path)) return fail(c, "socket path too long");
    strcpy(addr.sun_path, path);
    c->control = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c->control < 0) return fail(c, "socket: %s", strerror(errno));
    if (connect(c->control, (struct sockaddr *)&addr, sizeof(addr)) != 0) return fail(c, "connect %s: %s", path, strerror(errno));
    uint8_t hello[12], reply[16];
    put16(hello, 1); /* major */
    put16(hello + 2, minor);
    put32(hello + 4, capabilities);
    put32(hello + 8, role);
    size_t n;
    if (request(c, CMD_HELLO, hello, sizeof(hello), reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    if (n != 16 || get16(reply) != 1 || get16(reply + 2) < min_minor || get16(reply + 2) > minor)
        return fail(c, "HELLO reply: unsupported version");
    c->minor = get16(reply + 2);
    return 0;
}

int iopf_connect(struct iopf_client *c, const char *path) {
    return connect_and_hello(c, path, 0, 0, 1u << 1 | 1u << 2 /* stream channel, TRANSLATE */, 0 /* device */);
}

int iopf_attach(struct iopf_client *c, uint32_t device_id, int pasid, uint32_t credit) {
    uint8_t req[16], reply[MAX_MESSAGE];
    put32(req, device_id);
    put32(req + 4, (pasid >= 0 ? 1u : 0u) | 1u << 1); /* PASID_VALID, STREAM_CHANNEL */
    put32(req + 8, pasid >= 0 ? (uint32_t)pasid : 0);
    put32(req + 12, credit);
    int fds[MAX_FDS], nfds = 0;
    size_t n;
    if (request(c, CMD_ATTACH, req, sizeof(req), reply, sizeof(reply), &n, fds, &nfds) != 0) return -1;
    uint32_t windows = n >= 24 ? get16(reply + 16) : 0, regions = n >= 24 ? get16(reply + 18) : 0;
    if (n < 24 || get32(reply + 4) != 1 || windows > IOPF_MAX_WINDOWS || regions > IOPF_MAX_REGIONS ||
        n != 24 + 24 * windows + 16 * regions || nfds != (int)(2 + regions)) {
        close_fds(fds, nfds);
        return fail(c, "malformed ATTACH reply (%zu bytes, %d descriptors)", n, nfds);
    }
    c->device_id = device_id;
    c->pasid = pasid;
    c->credit = get32(reply);
    c->invalidate_timeout_ms = get32(reply + 8);
    c->invalidation = fds[0];
    c->channel = fds[1];
    const uint8_t *p = reply + 24;
    for (uint32_t i = 0; i < windows; i++, p += 24) {
        c->windows[i] = (struct iopf_window){.iova = get64(p), .size = get64(p + 8), .prot = get32(p + 16)};
    }
    c->window_count = (int)windows;
    for (uint32_t i = 0; i < regions; i++, p += 16) {
        int fd = fds[2 + i];
        struct iopf_region r = {.phys = get64(p), .size = get64(p + 8)};
        struct stat st;
        if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < r.size) {
            close_fds(fds + 2 + i, (int)(regions - i));
            return fail(c, "region %u: its memfd is smaller than its size", i);
        }
        r.base = mmap(NULL, r.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (r.base == MAP_FAILED) {
            close_fds(fds + 3 + i, (int)(regions - i - 1));
            return fail(c, "mmap region %u: %s", i, strerror(errno));
        }
        c->regions[c->region_count++] = r;
    }
    return 0;
}

int iopf_page_request_send(struct iopf_client *c, const uint64_t *iovas, int count, int write, uint32_t *cookie) {
    if (count < 1 || (uint32_t)count > c->credit) return fail(c, "a group has 1...credit (%u) pages", c->credit);
    if (c->in_flight_pages + (uint32_t)count > c->credit || c->in_flight == IOPF_MAX_IN_FLIGHT)
        return fail(c, "%d more pages would exceed the credit (%u, %u in flight): take answers first", count, c->credit,
                    c->in_flight_pages);
    uint8_t records[RECORD * 256];
    c->next_cookie = c->next_cookie == UINT32_MAX ? 1 : c->next_cookie + 1;
    c->next_group = (c->next_group + 1) & 511;
    for (int i = 0; i < count; i++) {
        uint8_t *r = records + RECORD * i;
        memset(r, 0, RECORD);
        uint32_t flags = (c->pasid >= 0 ? 1u : 0u) | (i == count - 1 ? 2u : 0u);
        put32(r, flags);
        put32(r + 4, c->device_id);
        put32(r + 8, c->pasid >= 0 ? (uint32_t)c->pasid : 0);
        put32(r + 12, c->next_group);
        put32(r + 16, write ? 3u : 1u);
        put64(r + 24, iovas[i] & ~0xFFFull);
        put32(r + 36, c->next_cookie);
    }
    if (send_all(c->channel, records, (size_t)RECORD * (size_t)count) != 0) return fail(c, "send records: %s", strerror(errno));
    c->flight[c->in_flight].cookie = c->next_cookie;
    c->flight[c->in_flight].pages = (uint32_t)count;
    c->in_flight++;
    c->in_flight_pages += (uint32_t)count;
    *cookie = c->next_cookie;
    return 0;
}

int iopf_page_responses(struct iopf_client *c, uint32_t *cookies, uint32_t *codes, int max, int timeout_ms) {
    if (max < 1) return fail(c, "room for at least one answer is needed");
    if (c->in_flight == 0) return fail(c, "no group is in flight");
    for (;;) {
        int ready = wait_readable_for(c, c->channel, timeout_ms);
        if (ready <= 0) return ready;
        int room = max < 64 ? max : 64;
        ssize_t n = read(c->channel, c->response_bytes + c->response_have, (size_t)(8 * room - c->response_have));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return fail(c, "the service closed the fault channel");
        c->response_have += (int)n;
        int whole = c->response_have / 8, got = 0;
        for (int i = 0; i < whole; i++) {
            uint32_t cookie = get32(c->response_bytes + 8 * i), value = get32(c->response_bytes + 8 * i + 4);
            int k = 0;
            while (k < c->in_flight && c->flight[k].cookie != cookie) k++;
            if (k == c->in_flight || value > 1) return fail(c, "unexpected response (cookie %u, code %u)", cookie, value);
            c->in_flight_pages -= c->flight[k].pages;
            c->flight[k] = c->flight[--c->in_flight];
            cookies[got] = cookie;
            codes[got++] = value;
        }
        c->response_have -= 8 * whole;
        memmove(c->response_bytes, c->response_bytes + 8 * whole, (size_t)c->response_have);
        if (got > 0) return got;
    }
}

int iopf_page_request(struct iopf_client *c, const uint64_t *iovas, int count, int write, uint32_t *code) {
    if (c->in_flight > 0) return fail(c, "groups are in flight: take their answers with iopf_page_responses");
    uint32_t cookie, answered;
    if (iopf_page_request_send(c, iovas, count, write, &cookie) != 0) return -1;
    int n = iopf_page_responses(c, &answered, code, 1, -1);
    return n == 1 ? 0 : -1;
}

int iopf_translate(struct iopf_client *c, uint64_t iova, uint32_t pages, uint64_t *entries) {
    if (pages < 1 || pages > IOPF_MAX_TRANSLATE) return fail(c, "TRANSLATE takes 1...512 pages");
    uint8_t req[16], reply[16 + 8 * IOPF_MAX_TRANSLATE];
    put64(req, iova);
    put32(req + 8, pages);
    put32(req + 12, 0);
    size_t n;
    if (request(c, CMD_TRANSLATE, req, sizeof(req), reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    if (n != 16 + 8 * (size_t)pages || get32(reply + 8) != pages) return fail(c, "malformed TRANSLATE reply");
    for (uint32_t i = 0; i < pages; i++) entries[i] = get64(reply + 16 + 8 * i);
    /* An INVALIDATE newer than the walk was processed meanwhile: the reply may be stale. */
    return get64(reply) >= c->invalidation_sequence ? 1 : 0;
}

void *iopf_phys_to_ptr(struct iopf_client *c, uint64_t phys, size_t len) {
    for (int i = 0; i < c->region_count; i++) {
        struct iopf_region *r = &c->regions[i];
        if (phys >= r->phys && phys - r->phys < r->size && len <= r->size - (phys - r->phys))
            return (uint8_t *)r->base + (phys - r->phys);
    }
    return NULL;
}

int iopf_detach(struct iopf_client *c) {
    uint8_t reply[16];
    size_t n;
    if (request(c, CMD_DETACH, NULL, 0, reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    return n == 0 ? 0 : fail(c, "malformed DETACH reply");
}

void iopf_close(struct iopf_client *c) {
    for (int i = 0; i < c->region_count; i++) munmap(c->regions[i].base, c->regions[i].size);
    c->region_count = 0;
    if (c->channel >= 0) close(c->channel);
    if (c->invalidation >= 0) close(c->invalidation);
    if (c->control >= 0) close(c->control);
    c->channel = c->invalidation = c->control = -1;
}

/* Hosts (protocol 1.1). */

int iopf_host_connect(struct iopf_client *c, const char *path) {
    /* Hosts are 1.1; 1.2 adds dirty tracking and PIN, 1.3 DMA_UNMAP's GET_DIRTY: each
     * needs the service to grant it. */
    return connect_and_hello(c, path, 3, 1, 0 /* no fault channel */, 1 /* host */);
}

int iopf_host_userfaultfd(struct iopf_client *c) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0) return fail(c, "userfaultfd: %s", strerror(errno));
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int e = errno;
        close(fd);
        return fail(c, "UFFDIO_API: %s", strerror(e));
    }
    return fd;
}

int iopf_host_declare(struct iopf_client *c, const char *name, const struct iopf_host_region *regions, int count,
                      int uffd, const int *memfds, int memfd_count) {
    size_t name_length = strlen(name);
    if (name_length < 1 || name_length > 64) return fail(c, "the name must be 1-64 bytes");
    if (count < 1 || count > 64) return fail(c, "1-64 regions");
    if (memfd_count < 1 || memfd_count + 1 > MAX_FDS) return fail(c, "1-%d memfds", MAX_FDS - 1);
    size_t padded = (name_length + 7) & ~(size_t)7;
    uint8_t p[16 + 64 + 32 * 64];
    size_t len = 16 + padded + 32 * (size_t)count;
    memset(p, 0, len);
    put32(p, (uint32_t)count);
    put32(p + 4, (uint32_t)name_length);
    put32(p + 8, 0); /* no other uids: the host's own only */
    memcpy(p + 16, name, name_length);
    for (int i = 0; i < count; i++) {
        uint8_t *r = p + 16 + padded + 32 * (size_t)i;
        put64(r, regions[i].host_address);
        put64(r + 8, regions[i].size);
        put64(r + 16, regions[i].fd_offset);
        put32(r + 24, 4096);
        put32(r + 28, regions[i].fd_index);
    }
    int fds[MAX_FDS];
    fds[0] = uffd;
    memcpy(fds + 1, memfds, sizeof(int) * (size_t)memfd_count);
    uint8_t reply[16];
    size_t n;
    if (request_fds(c, CMD_HOST, p, len, fds, memfd_count + 1, reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    return n == 0 ? 0 : fail(c, "malformed HOST reply");
}

static int host_map(struct iopf_client *c, uint64_t iova, uint64_t host_address, uint64_t size, uint32_t flags) {
    uint8_t p[32], reply[16];
    put64(p, iova);
    put64(p + 8, host_address);
    put64(p + 16, size);
    put32(p + 24, flags);
    put32(p + 28, 0);
    size_t n;
    if (request(c, CMD_DMA_MAP, p, sizeof(p), reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    return n == 0 ? 0 : fail(c, "malformed DMA_MAP reply");
}

int iopf_host_map(struct iopf_client *c, uint64_t iova, uint64_t host_address, uint64_t size, uint32_t prot) {
    if (prot & ~(IOPF_HOST_READ | IOPF_HOST_WRITE | IOPF_HOST_PIN))
        return fail(c, "prot is IOPF_HOST_READ | IOPF_HOST_WRITE, and IOPF_HOST_PIN");
    if ((prot & IOPF_HOST_PIN) && c->minor < 2) return fail(c, "PIN needs protocol 1.2; the service granted 1.%u", c->minor);
    return host_map(c, iova, host_address, size, prot);
}

int iopf_host_update(struct iopf_client *c, uint64_t iova, uint64_t host_address, uint64_t size) {
    return host_map(c, iova, host_address, size, 1u << 2); /* VADDR */
}

int iopf_host_unmap(struct iopf_client *c, uint64_t iova, uint64_t size, uint64_t *unmapped) {
    uint8_t p[16], reply[16];
    put64(p, iova);
    put64(p + 8, size);
    size_t n;
    if (request(c, CMD_DMA_UNMAP, p, sizeof(p), reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    if (n != 8) return fail(c, "malformed DMA_UNMAP reply");
    if (unmapped) *unmapped = get64(reply);
    return 0;
}

static int dirty_range(struct iopf_client *c, uint16_t cmd, uint64_t iova, uint64_t size) {
    if (c->minor < 2) return fail(c, "dirty tracking needs protocol 1.2; the service granted 1.%u", c->minor);
    uint8_t p[16], reply[16];
    put64(p, iova);
    put64(p + 8, size);
    size_t n;
    if (request(c, cmd, p, sizeof(p), reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    return n == 0 ? 0 : fail(c, "malformed reply");
}

int iopf_host_dirty_start(struct iopf_client *c, uint64_t iova, uint64_t size) {
    return dirty_range(c, CMD_DIRTY_START, iova, size);
}

int iopf_host_dirty_stop(struct iopf_client *c, uint64_t iova, uint64_t size) {
    return dirty_range(c, CMD_DIRTY_STOP, iova, size);
}

/* DIRTY_READ, or with `unmap` DMA_UNMAP with GET_DIRTY (1.3), whose request has flags and
 * whose reply starts with the bytes unmapped; inline when memfd < 0. The reply is checked
 * before a byte is copied. */
static int dirty_read(struct iopf_client *c, int unmap, uint64_t iova, uint64_t size, int memfd, uint64_t offset,
                      uint64_t *bitmap, size_t words, uint64_t *unmapped, uint64_t *reported) {
    uint16_t need_minor = unmap ? 3 : 2;
    if (c->minor < need_minor)
        return fail(c, "%s needs protocol 1.%u; the service granted 1.%u", unmap ? "GET_DIRTY" : "dirty tracking",
                    need_minor, c->minor);
    uint64_t need = ((size >> 12) + 63) / 64;
    if (memfd < 0 && words < need) return fail(c, "the bitmap holds %zu words, the range needs %llu", words,
                                               (unsigned long long)need);
    uint8_t p[32], reply[MAX_MESSAGE];
    put64(p, iova);
    put64(p + 8, size);
    if (unmap) {
        put32(p + 16, 1); /* GET_DIRTY */
        put32(p + 20, 0);
        put64(p + 24, offset);
    } else {
        put64(p + 16, offset);
    }
    size_t n, at = unmap ? 8 : 0; /* where the dirty part of the reply starts */
    int fds[1] = {memfd};
    if (request_fds(c, unmap ? CMD_DMA_UNMAP : CMD_DIRTY_READ, p, unmap ? 32 : 24, fds, memfd < 0 ? 0 : 1, reply,
                    sizeof(reply), &n, NULL, NULL) != 0)
        return -1;
    uint64_t inline_bytes = n >= at + 16 ? get64(reply + at + 8) : 0;
    if (n < at + 16 || n != at + 16 + inline_bytes || (memfd < 0 ? inline_bytes != need * 8 : inline_bytes != 0))
        return fail(c, "malformed %s reply (%zu bytes)", unmap ? "DMA_UNMAP" : "DIRTY_READ", n);
    for (uint64_t w = 0; memfd < 0 && w < need; w++) bitmap[w] = get64(reply + at + 16 + 8 * w);
    if (unmapped) *unmapped = get64(reply);
    if (reported) *reported = get64(reply + at);
    return 0;
}

int iopf_host_dirty_read(struct iopf_client *c, uint64_t iova, uint64_t size, uint64_t *bitmap, size_t words,
                         uint64_t *reported) {
    return dirty_read(c, 0, iova, size, -1, 0, bitmap, words, NULL, reported);
}

int iopf_host_dirty_read_memfd(struct iopf_client *c, uint64_t iova, uint64_t size, int memfd, uint64_t offset,
                               uint64_t *reported) {
    if (memfd < 0) return fail(c, "no memfd");
    return dirty_read(c, 0, iova, size, memfd, offset, NULL, 0, NULL, reported);
}

int iopf_host_unmap_dirty(struct iopf_client *c, uint64_t iova, uint64_t size, uint64_t *bitmap, size_t words,
                          uint64_t *unmapped, uint64_t *reported) {
    return dirty_read(c, 1, iova, size, -1, 0, bitmap, words, unmapped, reported);
}

int iopf_host_sync(struct iopf_client *c) {
    uint8_t reply[16];
    size_t n;
    if (request(c, CMD_SYNC, NULL, 0, reply, sizeof(reply), &n, NULL, NULL) != 0) return -1;
    return n == 0 ? 0 : fail(c, "malformed SYNC reply");
}

int iopf_host_detach(struct iopf_client *c) { return iopf_detach(c); }
