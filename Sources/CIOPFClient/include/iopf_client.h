/* iopf_client.h — a client of the iopf protocol in C, libc only: a device (protocol 1.0),
 * for device emulators (QEMU-style device models, vfio-user servers, co-simulation), and a
 * host (1.1), for a VMM that hands the service its guest memory (iopf_host_*, below).
 *
 * The protocol is documented in Sources/IOPFWire/IOPFWire.docc/Protocol.md. This client
 * takes the stream fault channel (40-byte page requests written to a socket, 8-byte
 * responses read back); the shared-ring channel is for clients that want no system call
 * per fault (the Swift client, IOPFDevice, implements it).
 *
 * Model: single-threaded. Every call that waits (iopf_page_request, iopf_translate,
 * iopf_poll_invalidations) also answers the service's INVALIDATEs while it waits: it calls
 * the `on_invalidate` callback, which must drop the device's cached translations of the
 * ranges and finish DMA that used them, then acknowledges. A device that does not call
 * into the library for longer than the invalidation deadline (iopf_client.invalidate_timeout_ms)
 * while it holds translations is fenced by the service.
 *
 * Errors: functions return 0 on success and -1 on failure, with a message in c->error.
 */
#ifndef IOPF_CLIENT_H
#define IOPF_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define IOPF_MAX_WINDOWS 64
#define IOPF_MAX_REGIONS 64
#define IOPF_MAX_TRANSLATE 512
#define IOPF_MAX_IN_FLIGHT 256 /* groups outstanding at once, at most (a credit is at most 256 pages) */

/* Page response codes (struct iommu_hwpt_page_response). */
#define IOPF_RESPONSE_SUCCESS 0u
#define IOPF_RESPONSE_INVALID 1u

/* Translation entry bits (TRANSLATE reply): physical address | READ | WRITE; 0 = not present. */
#define IOPF_TRANSLATION_READ 1ull
#define IOPF_TRANSLATION_WRITE 2ull

struct iopf_window {
    uint64_t iova;
    uint64_t size;
    uint32_t prot; /* bit 0 read, bit 1 write */
};

struct iopf_region {
    uint64_t phys;
    uint64_t size;
    void *base; /* this process's mapping of the region's memfd */
};

struct iopf_range {
    uint64_t start;
    uint64_t last; /* inclusive */
};

struct iopf_client;

/* Drop cached translations of `ranges` and finish DMA that used them. */
typedef void (*iopf_invalidate_fn)(struct iopf_client *c, const struct iopf_range *ranges, int count, void *ctx);

struct iopf_client {
    int control;      /* SOCK_SEQPACKET: the device's requests, the service's replies */
    int invalidation; /* SOCK_SEQPACKET: the service's INVALIDATEs, the device's acks */
    int channel;      /* SOCK_STREAM: page requests out, page responses in */
    uint16_t next_id;
    uint32_t device_id;
    int pasid; /* -1: none */
    uint32_t credit;
    uint32_t invalidate_timeout_ms;
    int window_count;
    struct iopf_window windows[IOPF_MAX_WINDOWS];
    int region_count;
    struct iopf_region regions[IOPF_MAX_REGIONS];
    uint64_t invalidation_sequence; /* the last INVALIDATE processed */
    uint32_t next_cookie;
    uint32_t next_group;
    uint8_t response_bytes[8 * 64];
    int response_have;
    /* Groups sent and not answered yet: cookie and pages (their pages count against credit). */
    int in_flight;
    uint32_t in_flight_pages;
    struct { uint32_t cookie; uint32_t pages; } flight[IOPF_MAX_IN_FLIGHT];
    unsigned long invalidations_acked;
    iopf_invalidate_fn on_invalidate;
    void *on_invalidate_ctx;
    uint16_t minor; /* the protocol minor the service granted */
    char error[256];
};

/* Connects to the service's socket and says HELLO. */
int iopf_connect(struct iopf_client *c, const char *path);

/* Attaches as `device_id` (pasid -1: none) asking for `credit` outstanding page requests;
 * maps the memory regions it is given. */
int iopf_attach(struct iopf_client *c, uint32_t device_id, int pasid, uint32_t credit);

/* Sends one page request group for `count` pages (1...credit) and waits for its response;
 * *code gets IOPF_RESPONSE_SUCCESS or IOPF_RESPONSE_INVALID. */
int iopf_page_request(struct iopf_client *c, const uint64_t *iovas, int count, int write, uint32_t *code);

/* Pipelined page requests, as PRI allows: send groups without waiting, up to the credit's
 * pages outstanding, and take their answers as they come (in any order the service
 * chooses). iopf_page_request_send sends one group of `count` pages; *cookie names it in
 * the answer. It fails, sending nothing, when the group's pages would exceed the credit
 * with those in flight: take answers first. */
int iopf_page_request_send(struct iopf_client *c, const uint64_t *iovas, int count, int write, uint32_t *cookie);

/* Waits up to timeout_ms (-1: forever, 0: not at all) for answers to groups in flight and
 * stores up to `max` of them (cookies[i] answered codes[i]). Returns how many (0: none in
 * time), or -1 on error; an answer for no group in flight is an error. Answers INVALIDATEs
 * while it waits. Do not mix with iopf_page_request while groups are in flight. */
int iopf_page_responses(struct iopf_client *c, uint32_t *cookies, uint32_t *codes, int max, int timeout_ms);

/* Translates `pages` pages from `iova` (1...512) into entries[]. Returns 1 when the reply
 * is current, 0 when an INVALIDATE processed meanwhile made it stale (ask again), -1 on error. */
int iopf_translate(struct iopf_client *c, uint64_t iova, uint32_t pages, uint64_t *entries);

/* This process's address of `len` bytes at physical address `phys`; NULL outside the regions. */
void *iopf_phys_to_ptr(struct iopf_client *c, uint64_t phys, size_t len);

/* Answers the INVALIDATEs that arrived, waiting up to timeout_ms (0: none waiting). Returns
 * how many were answered, or -1. */
int iopf_poll_invalidations(struct iopf_client *c, int timeout_ms);

/* Says DETACH and waits for its reply. */
int iopf_detach(struct iopf_client *c);

/* Unmaps the regions and closes every socket. */
void iopf_close(struct iopf_client *c);

/* Hosts (protocol 1.1; dirty tracking and PIN 1.2, GET_DIRTY 1.3). A host hands the
 * service its memory, memfds mapped MAP_SHARED and sealed F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, and a userfaultfd, which the service
 * registers on those ranges: the host's madvise/munmap/mremap then invalidate what its
 * devices (iopf_attach with an address space, or `iopf device --address-space`) hold. The
 * host must not read the userfaultfd or register ranges on it itself. A host connection
 * is a `struct iopf_client` used only with these calls. */

/* One region of the host's memory: where it is mapped here, its size, where it starts in
 * memfd number `fd_index` (an index into the memfds given to iopf_host_declare). */
struct iopf_host_region {
    uint64_t host_address;
    uint64_t size;
    uint64_t fd_offset;
    uint32_t fd_index;
};

/* DMA_MAP permission bits, and PIN (protocol 1.2): pinned and mapped whole before the
 * reply, as VFIO type1 maps, charged to this process's RLIMIT_MEMLOCK. */
#define IOPF_HOST_READ 1u
#define IOPF_HOST_WRITE 2u
#define IOPF_HOST_PIN 8u

/* Connects to the service's socket and says HELLO as a host. */
int iopf_host_connect(struct iopf_client *c, const char *path);

/* A userfaultfd the service can use (UFFDIO_API with EVENT_REMOVE | EVENT_UNMAP |
 * EVENT_REMAP, user faults only): the descriptor, or -1. Close it after iopf_host_declare. */
int iopf_host_userfaultfd(struct iopf_client *c);

/* HOST: declares the address space `name` (1-64 of [A-Za-z0-9._-]) over `regions`, handing
 * over `uffd` and the memfds (the service keeps its own copies). */
int iopf_host_declare(struct iopf_client *c, const char *name, const struct iopf_host_region *regions, int count,
                      int uffd, const int *memfds, int memfd_count);

/* DMA_MAP: [iova, iova + size) to host addresses from host_address; nothing is pinned
 * unless `prot` has IOPF_HOST_PIN. */
int iopf_host_map(struct iopf_client *c, uint64_t iova, uint64_t host_address, uint64_t size, uint32_t prot);

/* DMA_MAP with VADDR: the mapping exactly at [iova, iova + size) now lives at host_address
 * (after mremap or mmap(MAP_FIXED)); returns once every device dropped the old one. */
int iopf_host_update(struct iopf_client *c, uint64_t iova, uint64_t host_address, uint64_t size);

/* DMA_UNMAP: removes the mappings inside [iova, iova + size); `unmapped` (may be NULL)
 * gets the bytes removed. Returns once every device dropped them. */
int iopf_host_unmap(struct iopf_client *c, uint64_t iova, uint64_t size, uint64_t *unmapped);

/* SYNC: returns once every device acknowledged every invalidation posted before, those
 * of the host's own madvise/munmap/mremap included. */
int iopf_host_sync(struct iopf_client *c);

/* Dirty tracking (protocol 1.2), for migration. DIRTY_START: tracking on every mapping
 * [iova, iova + size) touches; returns once every device dropped its write access, so a
 * later write is logged. DIRTY_STOP names exactly a started range. */
int iopf_host_dirty_start(struct iopf_client *c, uint64_t iova, uint64_t size);
int iopf_host_dirty_stop(struct iopf_client *c, uint64_t iova, uint64_t size);

/* DIRTY_READ with the bitmap inline (ranges up to 256 MiB): the pages written in [iova,
 * iova + size) since the last read, cleared. Bit k of `bitmap` (bit k % 64 of word k / 64)
 * is the page at iova + k * 4 KiB; `words` must hold ceil(pages / 64). `reported` (may be
 * NULL) gets the pages set. */
int iopf_host_dirty_read(struct iopf_client *c, uint64_t iova, uint64_t size, uint64_t *bitmap, size_t words,
                         uint64_t *reported);

/* DIRTY_READ into `memfd` (sealed F_SEAL_SHRINK, at least offset + bitmap bytes) at byte
 * `offset` (8-aligned), for ranges up to 64 GiB. */
int iopf_host_dirty_read_memfd(struct iopf_client *c, uint64_t iova, uint64_t size, int memfd, uint64_t offset,
                               uint64_t *reported);

/* DMA_UNMAP with GET_DIRTY (protocol 1.3; VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP), the
 * bitmap inline (ranges up to 256 MiB, inside a started range): removes the whole mappings
 * inside and reports the pages written there since the last read, read with the removal
 * so that no write falls between. `unmapped` gets the bytes unmapped. */
int iopf_host_unmap_dirty(struct iopf_client *c, uint64_t iova, uint64_t size, uint64_t *bitmap, size_t words,
                          uint64_t *unmapped, uint64_t *reported);

/* DETACH: the service tears the address space down (devices detached, mappings removed,
 * ranges unregistered) before it answers. Then iopf_close. */
int iopf_host_detach(struct iopf_client *c);

#ifdef __cplusplus
}
#endif

#endif
