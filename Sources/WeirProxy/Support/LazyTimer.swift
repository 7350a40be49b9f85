import NIOCore

/// A deadline that can be moved cheaply on every request. Moving the
/// deadline later does not reschedule anything: the scheduled task fires at
/// the old time, sees the deadline moved and re-arms itself. Only moving it
/// earlier reschedules. So a busy keep-alive connection costs about one
/// scheduled task per timeout period instead of one per request.
///
/// Event-loop-bound; the owner calls `fire` from `onFire` and decides what
/// an expiry means.
struct LazyTimer {
    private(set) var deadline: NIODeadline? = nil
    private var task: Scheduled<Void>? = nil
    private var taskFiresAt: NIODeadline = .distantFuture

    /// Sets (or clears with nil) the deadline. `schedule` is called only when
    /// a new task is needed.
    mutating func set(_ deadline: NIODeadline?, on loop: EventLoop, onFire: @escaping () -> Void) {
        self.deadline = deadline
        guard let deadline else { return }
        if task != nil && taskFiresAt <= deadline { return }
        task?.cancel()
        taskFiresAt = deadline
        task = loop.scheduleTask(deadline: deadline, onFire)
    }

    /// Call at the start of `onFire`. Returns true when the deadline really
    /// passed; false when it was cleared or moved later (then it re-arms).
    mutating func fired(now: NIODeadline, on loop: EventLoop, onFire: @escaping () -> Void) -> Bool {
        task = nil
        taskFiresAt = .distantFuture
        guard let deadline else { return false }
        if now >= deadline {
            self.deadline = nil
            return true
        }
        taskFiresAt = deadline
        task = loop.scheduleTask(deadline: deadline, onFire)
        return false
    }

    mutating func cancel() {
        deadline = nil
        task?.cancel()
        task = nil
        taskFiresAt = .distantFuture
    }
}
