import Dispatch
import Foundation

/// SIGTERM/SIGINT delivered as a callback on a dispatch queue instead of an
/// async-signal handler, so the callback may do real work (drain, log).
final class SignalWatcher {
    private let sources: [DispatchSourceSignal]

    private init(sources: [DispatchSourceSignal]) { self.sources = sources }

    /// Calls `handler` with the signal number on the first SIGTERM or SIGINT
    /// and on every one after it (a second Ctrl-C may mean "hurry").
    static func onTermination(queue: DispatchQueue = DispatchQueue(label: "weir.signals"),
                              _ handler: @escaping (Int32) -> Void) -> SignalWatcher {
        let sources = [SIGTERM, SIGINT].map { signalNumber -> DispatchSourceSignal in
            // The default action would kill the process before the source fires.
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: queue)
            source.setEventHandler { handler(signalNumber) }
            source.resume()
            return source
        }
        return SignalWatcher(sources: sources)
    }

    func cancel() {
        for source in sources { source.cancel() }
    }
}
