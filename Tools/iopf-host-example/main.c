/* iopf-host-example — a host (a VMM, in miniature) in C on the iopf C client: hands the
 * service sealed memfd memory and a userfaultfd, maps it at an IOVA for its devices, then
 * takes pages back with madvise(MADV_REMOVE) again and again, each change followed by SYNC,
 * so that the devices attached to its address space (`iopf device --address-space NAME`)
 * fault around it while the service invalidates what they held. Ends on SIGTERM or after
 * --seconds, detaches, and prints one JSON object.
 *
 *   iopf-host-example PATH [--name NAME] [--memory MIB] [--mappings N] [--seconds S]
 *                          [--interval-ms MS] [--pinned] [--dirty-log]
 *
 * --pinned maps with PIN (protocol 1.2: pinned and mapped before its devices start).
 * --dirty-log, instead of taking pages back, starts dirty tracking (1.2) and every
 * --interval-ms reads and clears the log inline (--memory up to 256 MiB), counting the
 * pages its devices wrote.
 *
 * The memory is mapped read and write in N equal DMA mappings (default 4) from IOVA
 * 1 << 40; `iopf device --address-space NAME --device-id K` works in mapping (K - 1) mod N.
 * --seconds 0 runs until SIGTERM. Exit status: 0 when every call
 * succeeded, 2 otherwise (the error is printed on stderr and in the JSON). libc only. */
#define _GNU_SOURCE
#include <iopf_client.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int die(struct iopf_client *c, const char *what) {
    fprintf(stderr, "iopf-host-example: %s: %s\n", what, c->error);
    printf("{\"error\": \"%s: %s\"}\n", what, c->error);
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: iopf-host-example PATH [--name NAME] [--memory MIB] [--mappings N] [--seconds S] "
                        "[--interval-ms MS] [--pinned] [--dirty-log]\n");
        return 2;
    }
    const char *path = argv[1], *name = "c-host";
    int pinned = 0, dirty_log = 0;
    unsigned long mib = 16, interval_ms = 5, mappings = 4;
    double seconds = 3;
    for (int i = 2; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--pinned")) pinned = 1;
        else if (!strcmp(argv[i], "--dirty-log")) dirty_log = 1;
        else if (value && !strcmp(argv[i], "--name")) name = argv[++i];
        else if (value && !strcmp(argv[i], "--memory")) mib = strtoul(argv[++i], NULL, 10);
        else if (value && !strcmp(argv[i], "--seconds")) seconds = strtod(argv[++i], NULL);
        else if (value && !strcmp(argv[i], "--mappings")) mappings = strtoul(argv[++i], NULL, 10);
        else if (value && !strcmp(argv[i], "--interval-ms")) interval_ms = strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "iopf-host-example: unknown option or missing value: %s\n", argv[i]);
            return 2;
        }
    }
    if (mib < 1 || mib > 4096 || seconds < 0 || mappings < 1 || mappings > 256 || ((mib << 8) % mappings) != 0 ||
        (dirty_log && mib > 256)) {
        fprintf(stderr, "iopf-host-example: --memory must be 1-4096 MiB (256 with --dirty-log), --mappings 1-256 "
                        "dividing its pages, --seconds at least 0\n");
        return 2;
    }
    /* A parent may have blocked these (a blocked mask survives exec): unblock them. */
    sigset_t stops;
    sigemptyset(&stops);
    sigaddset(&stops, SIGTERM);
    sigaddset(&stops, SIGINT);
    sigprocmask(SIG_UNBLOCK, &stops, NULL);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    uint64_t size = (uint64_t)mib << 20, iova = 1ull << 40;

    /* The guest memory: a memfd sealed against shrinking and growing, mapped shared. */
    int memfd = memfd_create("iopf-host-example", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0 || ftruncate(memfd, (off_t)size) != 0 ||
        fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        perror("iopf-host-example: memfd");
        return 2;
    }
    uint8_t *memory = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (memory == MAP_FAILED) {
        perror("iopf-host-example: mmap");
        return 2;
    }

    struct iopf_client c;
    if (iopf_host_connect(&c, path) != 0) return die(&c, "connect");
    int uffd = iopf_host_userfaultfd(&c);
    if (uffd < 0) return die(&c, "userfaultfd");
    struct iopf_host_region region = {.host_address = (uint64_t)(uintptr_t)memory, .size = size, .fd_offset = 0, .fd_index = 0};
    if (iopf_host_declare(&c, name, &region, 1, uffd, &memfd, 1) != 0) return die(&c, "HOST");
    close(uffd); /* the service's copy is the one that matters; this process never reads it */
    uint64_t slice = size / mappings;
    for (unsigned long k = 0; k < mappings; k++) {
        if (iopf_host_map(&c, iova + k * slice, region.host_address + k * slice, slice,
                          IOPF_HOST_READ | IOPF_HOST_WRITE | (pinned ? IOPF_HOST_PIN : 0)) != 0)
            return die(&c, "DMA_MAP");
    }
    if (dirty_log && iopf_host_dirty_start(&c, iova, size) != 0) return die(&c, "DIRTY_START");
    uint64_t *bitmap = dirty_log ? calloc((size >> 12) / 64 + 1, sizeof(uint64_t)) : NULL;
    unsigned long rounds = 0, reported_total = 0;

    /* Take pages back, as a balloon would: each change is seen by the service through the
     * userfaultfd, and SYNC returns once every device dropped what it held there. */
    unsigned long changes = 0, pages_removed = 0;
    double sync_total = 0, sync_max = 0, start = now();
    unsigned int seed = 1;
    while (!stop && (seconds == 0 || now() - start < seconds)) {
        usleep((useconds_t)(interval_ms * 1000));
        if (dirty_log) {
            uint64_t reported = 0, set = 0;
            if (iopf_host_dirty_read(&c, iova, size, bitmap, (size >> 12) / 64 + 1, &reported) != 0)
                return die(&c, "DIRTY_READ");
            for (uint64_t w = 0; w < ((size >> 12) + 63) / 64; w++) set += (uint64_t)__builtin_popcountll(bitmap[w]);
            if (set != reported) {
                fprintf(stderr, "iopf-host-example: DIRTY_READ reported %llu pages, its bitmap %llu\n",
                        (unsigned long long)reported, (unsigned long long)set);
                return 2;
            }
            rounds++;
            reported_total += (unsigned long)reported;
            continue;
        }
        uint64_t pages = size >> 12;
        uint64_t first = (uint64_t)rand_r(&seed) % pages, count = 1 + (uint64_t)rand_r(&seed) % 16;
        if (first + count > pages) count = pages - first;
        if (madvise(memory + (first << 12), count << 12, MADV_REMOVE) != 0) {
            fprintf(stderr, "iopf-host-example: madvise: %s\n", strerror(errno));
            return 2;
        }
        double t0 = now();
        if (iopf_host_sync(&c) != 0) return die(&c, "SYNC");
        double took = now() - t0;
        sync_total += took;
        if (took > sync_max) sync_max = took;
        changes++;
        pages_removed += (unsigned long)count;
    }
    /* With the log on, the unmap is a last round: GET_DIRTY reports what was written since
     * the last read, as QEMU asks VFIO when a mapping goes during migration. */
    uint64_t unmapped = 0, unmap_reported = 0;
    if (dirty_log) {
        if (iopf_host_unmap_dirty(&c, iova, size, bitmap, (size >> 12) / 64 + 1, &unmapped, &unmap_reported) != 0)
            return die(&c, "DMA_UNMAP with GET_DIRTY");
        uint64_t set = 0;
        for (uint64_t w = 0; w < ((size >> 12) + 63) / 64; w++) set += (uint64_t)__builtin_popcountll(bitmap[w]);
        if (set != unmap_reported) {
            fprintf(stderr, "iopf-host-example: DMA_UNMAP reported %llu pages, its bitmap %llu\n",
                    (unsigned long long)unmap_reported, (unsigned long long)set);
            return 2;
        }
        if (iopf_host_dirty_stop(&c, iova, size) != 0) return die(&c, "DIRTY_STOP");
    } else if (iopf_host_unmap(&c, iova, size, &unmapped) != 0) {
        return die(&c, "DMA_UNMAP");
    }
    free(bitmap);
    if (iopf_host_detach(&c) != 0) return die(&c, "DETACH");
    iopf_close(&c);
    munmap(memory, size);
    close(memfd);
    printf("{\"name\": \"%s\", \"memoryBytes\": %llu, \"hostChanges\": %lu, \"pagesRemoved\": %lu, "
           "\"unmappedBytes\": %llu, \"syncMeanNs\": %.0f, \"syncMaxNs\": %.0f, \"pinned\": %s, "
           "\"dirtyRounds\": %lu, \"dirtyPagesReported\": %lu, \"unmapDirtyPages\": %llu}\n",
           name, (unsigned long long)size, changes, pages_removed, (unsigned long long)unmapped,
           changes ? sync_total / (double)changes * 1e9 : 0.0, sync_max * 1e9, pinned ? "true" : "false", rounds,
           reported_total, (unsigned long long)unmap_reported);
    return 0;
}
