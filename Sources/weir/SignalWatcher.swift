import Dispatch
import Foundation

/// Signals delivered as a callback on a dispatch queue instead of an
/// async-signal handler, so the callback may do real work (drain, log).
///
/// Call `blockBeforeStartingThreads` first thing in a command, before any
/// thread exists. Why: on Linux a dispatch signal source reads a signalfd
/// that the dispatch manager thread sets up *asynchronously* after
/// `resume()`. A signal that arrives before that was ignored (the old
/// `SIG_IGN` here) or killed the process (the default action), so a SIGINT
/// sent right after "weir started" was sometimes lost and the gateway never
/// drained (a test hang; gdb showed the main thread waiting for the drain and
/// no "draining" line). A signal blocked in every thread instead stays
/// pending until the signalfd takes it, however late that is.
final class SignalWatcher {
    private let sources: [DispatchSourceSignal]

    /// Calls `handler` with the signal number for every delivery of any of `signals`.
    init(_ signals: [Int32], queue: DispatchQueue = DispatchQueue(label: "weir.signals"),
         handler: @escaping (Int32) -> Void) {
        // Normally done already (before the threads started); harmless then.
        SignalWatcher.blockBeforeStartingThreads(signals)
        sources = signals.map { signalNumber -> DispatchSourceSignal in
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: queue)
            source.setEventHandler { handler(signalNumber) }
            source.resume()
            return source
        }
    }

    /// Blocks `signals` in the calling thread; threads it starts afterwards
    /// inherit the mask, so a signal waits (pending) for the watcher instead
    /// of being lost or killing the process. Never set such a signal to
    /// `SIG_IGN`: that discards it even while it is pending.
    static func blockBeforeStartingThreads(_ signals: [Int32]) {
        var set = sigset_t()
        sigemptyset(&set)
        for signalNumber in signals { sigaddset(&set, signalNumber) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// SIGTERM and SIGINT, every delivery (a second one may mean "hurry").
    static func onTermination(_ handler: @escaping (Int32) -> Void) -> SignalWatcher {
        SignalWatcher(terminationSignals, handler: handler)
    }

    static let terminationSignals: [Int32] = [SIGTERM, SIGINT]

    func cancel() {
        for source in sources { source.cancel() }
    }
}
