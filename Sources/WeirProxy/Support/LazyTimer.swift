import NIOCore

/// A deadline that can be moved cheaply on every request. Moving the
/// deadline later does not reschedule anything: the scheduled task fires at
/// the old time, sees the deadline moved and re-arms itself. Only moving it
/// earlier reschedules. So a busy keep-alive connection costs about one
/// scheduled task per timeout period instead of one per request, and the
/// callback closure is made once per connection, not per request.
///
/// Event-loop-bound. The owner's callback starts with `fired(now:)` (or
/// `taskFired()` when it computes deadlines itself) and decides what an
/// expiry means.
struct LazyTimer {
    private(set) var deadline: NIODeadline? = nil
    private var task: Scheduled<Void>? = nil
    private var taskFiresAt: NIODeadline = .distantFuture
    private var loop: EventLoop? = nil
    private var onFire: (() -> Void)? = nil

    /// Call once before use. `onFire` captures its owner weakly, or
    /// strongly with the owner calling `tearDown` when it is done (that
    /// breaks the owner -> timer -> closure -> owner cycle).
    mutating func setUp(loop: EventLoop, onFire: @escaping () -> Void) {
        self.loop = loop
        self.onFire = onFire
    }

    /// Cancels and lets go of the loop and the closure: `set` does nothing
    /// after it.
    mutating func tearDown() {
        cancel()
        loop = nil
        onFire = nil
    }

    /// Sets (or clears with nil) the deadline.
    mutating func set(_ deadline: NIODeadline?) {
        self.deadline = deadline
        guard let deadline else { return }
        // The usual case first: the task fires no later (and re-arms then).
        if task != nil && taskFiresAt <= deadline { return }
        guard let loop, let onFire else { return }
        task?.cancel()
        taskFiresAt = deadline
        task = loop.scheduleTask(deadline: deadline, onFire)
    }

    /// Call at the start of the callback. True when the deadline really
    /// passed; false when it was cleared or moved later (then it re-arms).
    mutating func fired(now: NIODeadline) -> Bool {
        taskFired()
        guard let deadline else { return false }
        if now >= deadline {
            self.deadline = nil
            return true
        }
        set(deadline)
        return false
    }

    /// Forgets the task that just ran, so the next `set` schedules a new one.
    mutating func taskFired() {
        task = nil
        taskFiresAt = .distantFuture
    }

    mutating func cancel() {
        deadline = nil
        task?.cancel()
        task = nil
        taskFiresAt = .distantFuture
    }
}
