/* iopf-device-example — a device emulator in C on the iopf C client: attaches to a
 * service's socket, writes a pattern to N pages of its DMA window through translations it
 * obtains by page requests, reads every page back through fresh translations, answers
 * every invalidation, detaches, and prints one JSON object.
 *
 *   iopf-device-example PATH [--pages N] [--device-id ID] [--outstanding N]
 *
 * With --outstanding N (1-64) it first faults its pages in with up to N page request
 * groups in flight (iopf_page_request_send / iopf_page_responses), one page each, as a
 * device with PRI credit may; the writes and reads then go as before.
 *
 * Exit status: 0 when every page read back what was written, 1 on integrity errors, 2 on
 * any other error. */
#include <iopf_client.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct stats {
    unsigned long faults, groups, translations, invalidated_ranges;
};

/* This device caches nothing between a translation and its access, so an INVALIDATE has
 * nothing to drop: it only counts. A device with an IOTLB drops the ranges here. */
static void on_invalidate(struct iopf_client *c, const struct iopf_range *ranges, int count, void *ctx) {
    (void)c;
    (void)ranges;
    ((struct stats *)ctx)->invalidated_ranges += (unsigned long)count;
}

/* A current translation of `iova` for the access, faulting the page in when needed. */
static void *translate(struct iopf_client *c, struct stats *s, uint64_t iova, int write) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint64_t entry;
        int fresh = iopf_translate(c, iova, 1, &entry);
        if (fresh < 0) return NULL;
        s->translations++;
        if (!fresh) continue;
        uint64_t need = write ? IOPF_TRANSLATION_WRITE : IOPF_TRANSLATION_READ;
        if (entry != 0 && (entry & need)) {
            void *p = iopf_phys_to_ptr(c, entry & ~0xFFFull, 4096);
            if (!p) snprintf(c->error, sizeof(c->error), "iova 0x%llx translates outside the regions", (unsigned long long)iova);
            return p;
        }
        uint32_t code;
        if (iopf_page_request(c, &iova, 1, write, &code) != 0) return NULL;
        s->faults++;
        s->groups++;
        if (code != IOPF_RESPONSE_SUCCESS) {
            snprintf(c->error, sizeof(c->error), "page request for iova 0x%llx answered INVALID", (unsigned long long)iova);
            return NULL;
        }
    }
    snprintf(c->error, sizeof(c->error), "iova 0x%llx never became present", (unsigned long long)iova);
    return NULL;
}

/* Faults in the pages of [base, base + pages * 4 KiB) that are not present, keeping up to
 * `outstanding` single-page groups in flight. Returns 0, or -1 with c->error set. */
static int prefault(struct iopf_client *c, struct stats *s, uint64_t base, long pages, int outstanding) {
    long next = 0;
    while (next < pages || c->in_flight > 0) {
        while (next < pages && c->in_flight < outstanding && c->in_flight_pages < c->credit) {
            uint64_t iova = base + (uint64_t)next++ * 4096, entry;
            int fresh = iopf_translate(c, iova, 1, &entry);
            if (fresh < 0) return -1;
            s->translations++;
            if (fresh && (entry & IOPF_TRANSLATION_WRITE)) continue; /* present already (mapped ahead) */
            uint32_t cookie;
            if (iopf_page_request_send(c, &iova, 1, 1, &cookie) != 0) return -1;
            s->faults++;
            s->groups++;
        }
        if (c->in_flight == 0) continue;
        uint32_t cookies[64], codes[64];
        int n = iopf_page_responses(c, cookies, codes, 64, 5000);
        if (n < 0) return -1;
        if (n == 0) {
            snprintf(c->error, sizeof(c->error), "no answer in 5 s with %d groups in flight", c->in_flight);
            return -1;
        }
        for (int i = 0; i < n; i++) {
            if (codes[i] != IOPF_RESPONSE_SUCCESS) {
                snprintf(c->error, sizeof(c->error), "page request %u answered INVALID", cookies[i]);
                return -1;
            }
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    long pages = 256;
    unsigned long device_id = 100;
    long outstanding = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--pages") == 0 && i + 1 < argc) pages = strtol(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--device-id") == 0 && i + 1 < argc) device_id = strtoul(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--outstanding") == 0 && i + 1 < argc) outstanding = strtol(argv[++i], NULL, 10);
        else if (!path && argv[i][0] != '-') path = argv[i];
        else {
            fprintf(stderr, "usage: iopf-device-example PATH [--pages N] [--device-id ID] [--outstanding N]\n");
            return 2;
        }
    }
    if (!path || pages < 1 || outstanding < 0 || outstanding > 64) {
        fprintf(stderr, "usage: iopf-device-example PATH [--pages N] [--device-id ID] [--outstanding N]\n");
        return 2;
    }
    struct iopf_client c;
    struct stats s = {0};
    uint32_t credit = outstanding > 32 ? (uint32_t)outstanding : 32;
    if (iopf_connect(&c, path) != 0 || iopf_attach(&c, (uint32_t)device_id, -1, credit) != 0) {
        fprintf(stderr, "iopf-device-example: %s\n", c.error);
        iopf_close(&c);
        return 2;
    }
    c.on_invalidate = on_invalidate;
    c.on_invalidate_ctx = &s;
    if (c.window_count < 1 || (uint64_t)pages * 4096 > c.windows[0].size) {
        fprintf(stderr, "iopf-device-example: the DMA window holds fewer than %ld pages\n", pages);
        iopf_close(&c);
        return 2;
    }
    uint64_t base = c.windows[0].iova;
    long written = 0, errors = 0;
    if (outstanding > 0 && prefault(&c, &s, base, pages, (int)outstanding) != 0) goto failed;
    for (long i = 0; i < pages; i++) {
        uint64_t *p = translate(&c, &s, base + (uint64_t)i * 4096, 1);
        if (!p) goto failed;
        for (int w = 0; w < 512; w++) p[w] = (uint64_t)device_id << 48 ^ (uint64_t)i << 16 ^ (uint64_t)w;
        written++;
        if (iopf_poll_invalidations(&c, 0) < 0) goto failed;
    }
    for (long i = 0; i < pages; i++) {
        const uint64_t *p = translate(&c, &s, base + (uint64_t)i * 4096, 0);
        if (!p) goto failed;
        for (int w = 0; w < 512; w++) {
            if (p[w] != ((uint64_t)device_id << 48 ^ (uint64_t)i << 16 ^ (uint64_t)w)) {
                errors++;
                break;
            }
        }
    }
    if (iopf_detach(&c) != 0) goto failed;
    printf("{\"faults\": %lu, \"groups\": %lu, \"pagesWritten\": %ld, \"integrityErrors\": %ld, \"invalidationsAcked\": %lu, "
           "\"translations\": %lu}\n",
           s.faults, s.groups, written, errors, c.invalidations_acked, s.translations);
    iopf_close(&c);
    return errors ? 1 : 0;
failed:
    fprintf(stderr, "iopf-device-example: %s\n", c.error);
    printf("{\"faults\": %lu, \"groups\": %lu, \"pagesWritten\": %ld, \"integrityErrors\": %ld, \"invalidationsAcked\": %lu, "
           "\"error\": \"see standard error\"}\n",
           s.faults, s.groups, written, errors, c.invalidations_acked);
    iopf_close(&c);
    return 2;
}
