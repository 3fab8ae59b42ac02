// SpinWindow.swift — how long the event loop busy-polls after its last work before it
// sleeps in io_uring, adapted to how far apart work arrives.
//
// The rule is KVM's halt polling (virt/kvm/kvm_main.c, `kvm_vcpu_halt`): an idle period
// the window covered keeps it; one that ended after the window but before the maximum
// (a longer spin would have saved the wake-up) doubles it, from 10 µs; one longer than
// the maximum (no spin would have caught it) halves it, to 0 below 10 µs. Times are in
// nanoseconds.
//
// Why: a spin that catches nothing costs a CPU for its whole length, and on a machine
// with few cores it is a CPU the devices wanted. A device thread of lower priority that
// shares the service's CPU cannot run until the spin ends, so with sparse faults a fixed
// 200 µs spin became a 200 µs wait for every fault (measured in docs/benchmarks.md).

/// The loop's adaptive spin: `nanoseconds` after the last work, at most `maximum`.
struct SpinWindow: Sendable, Equatable {
    /// The first window a grow gives, and the smallest one kept by a shrink.
    static let growStart: Int64 = 10_000

    /// The configured spin (`ServiceConfiguration.spinNanoseconds`).
    let maximum: Int64
    /// The current window.
    private(set) var nanoseconds: Int64

    /// Starts at `maximum`: a service that has just started expects its devices soon.
    init(maximum: Int64) {
        self.maximum = max(0, maximum)
        nanoseconds = self.maximum
    }

    /// Adapts the window to an idle period that just ended (work arrived `idle`
    /// nanoseconds after the last work, whether the loop spun or slept meanwhile).
    mutating func idleEnded(after idle: Int64) {
        if idle <= nanoseconds { return }
        if idle < maximum {
            nanoseconds = min(maximum, max(Self.growStart, nanoseconds * 2))
        } else {
            nanoseconds /= 2
            if nanoseconds < Self.growStart { nanoseconds = 0 }
        }
    }
}
