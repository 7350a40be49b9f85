import NIOCore

/// The event loop's notion of "now", read once per I/O event instead of at
/// every use (a proxied request used to read the clock 14 times; nginx reads
/// it once per loop turn).
///
/// An inbound event handler brackets its work with `enterEvent()` /
/// `leaveEvent()`; while inside, `now` is the time the event began (one
/// `clock_gettime`). Outside any event (timers, connect completions,
/// futures) `now` reads the clock afresh, so a value is never older than
/// the synchronous handling of one read: durations computed from it are
/// correct to within one loop turn and never negative (the monotonic clock
/// never goes back, and the cached value only moves forward). Scheduled
/// timeouts stay NIO's own deadlines; this only feeds timestamps
/// (durations, idle-since, last-read marks, health windows).
///
/// One instance per `LoopContext`, used on its loop only: no locks.
final class LoopClock {
    private var cached: NIODeadline = .uptimeNanoseconds(0)
    /// Nesting depth of `enterEvent` (an event handler may run inside
    /// another's synchronous call chain); the outermost one reads the clock.
    private var depth = 0

    // Inlined: called a dozen times per request, each would otherwise pay
    // a call plus a retain/release of the clock.
    var now: NIODeadline {
        @inline(__always) get {
            depth > 0 ? cached : NIODeadline.now()
        }
    }

    /// `now` as `MonotonicClock` nanoseconds (WeirCore's health and balancers).
    var nowNanoseconds: UInt64 {
        @inline(__always) get { now.uptimeNanoseconds }
    }

    @inline(__always)
    func enterEvent() {
        if depth == 0 {
            let fresh = NIODeadline.now()
            if fresh > cached { cached = fresh }
        }
        depth += 1
    }

    @inline(__always)
    func leaveEvent() {
        depth -= 1
    }

    // MARK: Wall clock

    /// The pair (monotonic, wall) `wallSeconds` counts from; re-read once a
    /// second so clock adjustments (NTP) show up within a second.
    private var wallBaseMonotonic: NIODeadline = .uptimeNanoseconds(0)
    private var wallBaseSeconds: Double = 0

    /// Wall-clock seconds since 1970 for `now` (access-log start times):
    /// the monotonic time shifted by an offset read at most once a second,
    /// instead of a `CLOCK_REALTIME` read per request.
    var wallSeconds: Double { wallSeconds(at: now) }

    /// Wall-clock seconds for `t`, a monotonic time of this loop's recent
    /// past (an exchange's start, converted when a log phase needs it).
    func wallSeconds(at t: NIODeadline) -> Double {
        if wallBaseSeconds == 0 || t.uptimeNanoseconds &- wallBaseMonotonic.uptimeNanoseconds > 1_000_000_000 {
            wallBaseMonotonic = NIODeadline.now()
            wallBaseSeconds = wallClockSeconds()
        }
        // Signed: a cached `now` may be a little older than the base.
        let sinceBase = Int64(bitPattern: t.uptimeNanoseconds &- wallBaseMonotonic.uptimeNanoseconds)
        return wallBaseSeconds + Double(sinceBase) / 1e9
    }
}
