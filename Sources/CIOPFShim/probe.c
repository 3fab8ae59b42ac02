// probe.c — confirming host pages by touching them, the user-space stand-in for the
// kernel's get_user_pages_fast: a page already in the calling process's page table costs
// a load (or a locked no-op write), not a system call; a missing one is faulted in by the
// CPU exactly as MADV_POPULATE_* would fault it in. Measured in C on 64 MiB of shared
// memory, per page: present 15 ns against 160-730 ns populating; missing 3.2 against
// 2.7-4.0 us; in the page cache but not the page table 1.5 against 0.9-1.8 us. So a run
// of several pages is timed page by page, and the first page that took as long as a fault
// hands the rest of the run to one populate call.
//
// It lives in C because it needs sigsetjmp/siglongjmp, which Swift cannot call: a touch
// that the kernel answers with SIGSEGV (not mapped) or SIGBUS (beyond a memfd's end, no
// huge page left, hardware poison) jumps back here and the probe returns -1, so the
// caller asks madvise(2) for the errno and its message. Signals not raised inside a probe
// go to the handler that was installed before ours, or, if that was the default, kill
// the process as they would have.
//
// Conventions: the handler is installed once per process (iopf_probe_install) and never
// removed; the jump target is per thread; sigsetjmp does not save the mask (no system call
// per probe), so a probe that jumped unblocks SIGSEGV and SIGBUS itself.
#define _GNU_SOURCE
#include "iopf_shim.h"
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>

static _Thread_local sigjmp_buf *volatile probe_jump;
static struct sigaction previous_segv, previous_bus;
static pthread_once_t installed = PTHREAD_ONCE_INIT;
static int install_error;

static void probe_handler(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *jump = probe_jump;
    if (jump) {
        probe_jump = 0;
        siglongjmp(*jump, 1);
    }
    struct sigaction *previous = sig == SIGBUS ? &previous_bus : &previous_segv;
    if (previous->sa_flags & SA_SIGINFO) {
        previous->sa_sigaction(sig, info, context);
    } else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN) {
        previous->sa_handler(sig);
    } else {
        // Returning re-executes the access, which now ends the process as it would have.
        signal(sig, SIG_DFL);
    }
}

static void install(void) {
    struct sigaction action = {0};
    action.sa_sigaction = probe_handler;
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &previous_segv) != 0 || sigaction(SIGBUS, &action, &previous_bus) != 0)
        install_error = -1;
}

int iopf_probe_install(void) {
    pthread_once(&installed, install);
    return install_error;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

// Not instrumented: a device may be writing the same page (its DMA) while the probe does
// its locked no-op write, which is atomic on the hardware but a race in TSan's model; the
// probe changes no byte, so the report would be noise.
__attribute__((no_sanitize("thread"), no_sanitize("address")))
long iopf_probe_pages(const void *address, size_t pages, int write, uint64_t fault_ns) {
    sigjmp_buf jump;
    if (sigsetjmp(jump, 0)) {
        // The jump left the handler without restoring the mask; a sanitizer's wrapper may
        // have blocked the signal despite SA_NODEFER, and a blocked SIGSEGV kills.
        sigset_t faults;
        sigemptyset(&faults);
        sigaddset(&faults, SIGSEGV);
        sigaddset(&faults, SIGBUS);
        pthread_sigmask(SIG_UNBLOCK, &faults, 0);
        return -1;
    }
    probe_jump = &jump;
    uint64_t before = fault_ns ? now_ns() : 0;
    size_t i = 0;
    while (i < pages) {
        volatile uint64_t *word = (volatile uint64_t *)((const char *)address + (i << 12));
        if (write)
            __atomic_fetch_or(word, 0, __ATOMIC_RELAXED);  // volatile: not folded into a load
        else
            (void)*word;
        i++;
        if (fault_ns) {
            uint64_t after = now_ns();
            if (after - before > fault_ns) break;  // it faulted: the rest likely will too
            before = after;
        }
    }
    probe_jump = 0;
    return (long)i;
}
