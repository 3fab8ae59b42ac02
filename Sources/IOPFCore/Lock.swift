// The one lock type of the package: a pthread mutex beside the value it guards.
//
// Why not `Synchronization.Mutex`: on Linux it is built on futexes inside the standard
// library, which is not instrumented, so ThreadSanitizer sees neither its acquire nor its
// release and reports every pair of accesses made under it as a race (hundreds per suite
// run), hiding the real ones. Every sanitizer runtime intercepts `pthread_mutex_lock`, so
// with this type TSan's reports mean something. Uncontended cost is the same (one atomic
// exchange each way; measured with `iopf-microbench`, see docs/benchmarks.md).
//
// Both the mutex and the value live in one heap allocation that never moves (a pthread
// mutex must not be copied), and the value is reached through a pointer, so `withLock`
// pays no dynamic exclusivity check.

import Glibc

/// A value behind a pthread mutex, which ThreadSanitizer sees (it does not see `Synchronization.Mutex` on Linux).
public final class Lock<Value>: @unchecked Sendable {
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @usableFromInline let value: UnsafeMutablePointer<Value>

    /// A lock holding `initialValue`.
    public init(_ initialValue: consuming sending Value) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let rc = pthread_mutex_init(mutex, nil)
        precondition(rc == 0, "pthread_mutex_init failed: \(rc)")
        value = .allocate(capacity: 1)
        value.initialize(to: initialValue)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    /// Runs `body` with the value while holding the lock. Not reentrant.
    @inlinable @inline(__always)
    public func withLock<Result, E: Error>(_ body: (inout sending Value) throws(E) -> sending Result) throws(E)
        -> sending Result
    {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
