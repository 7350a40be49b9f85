import Dispatch
import Foundation

/// Signals delivered as a callback on a dispatch queue instead of an
/// async-signal handler, so the callback may do real work (drain, log).
final class SignalWatcher {
    private let sources: [DispatchSourceSignal]

    /// Calls `handler` with the signal number for every delivery of any of `signals`.
    init(_ signals: [Int32], queue: DispatchQueue = DispatchQueue(label: "weir.signals"),
         handler: @escaping (Int32) -> Void) {
        sources = signals.map { signalNumber -> DispatchSourceSignal in
            // The default action would kill the process before the source fires.
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: queue)
            source.setEventHandler { handler(signalNumber) }
            source.resume()
            return source
        }
    }

    /// SIGTERM and SIGINT, every delivery (a second one may mean "hurry").
    static func onTermination(_ handler: @escaping (Int32) -> Void) -> SignalWatcher {
        SignalWatcher([SIGTERM, SIGINT], handler: handler)
    }

    func cancel() {
        for source in sources { source.cancel() }
    }
}
