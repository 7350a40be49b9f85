import WeirLua

/// The hot natives' calls on the proxy's request context (see
/// `PluginRequestCalls`): `object` is an `ExchangePlugins`, borrowed for
/// the call, so no retain and release of the context per native call.
final class ExchangePluginsCalls: PluginRequestCalls {
    static let shared = ExchangePluginsCalls()

    @inline(__always)
    private func on<R>(_ object: UnsafeMutableRawPointer, _ body: (ExchangePlugins) -> R) -> R {
        Unmanaged<ExchangePlugins>.fromOpaque(object)._withUnsafeGuaranteedRef(body)
    }

    override func withRequestHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        on(object) { $0.withRequestHeader(name, body) }
    }
    override func withRequestHeader(_ object: UnsafeMutableRawPointer, _ name: String, nameBytes: UnsafeRawBufferPointer,
                                    _ body: (UnsafeRawBufferPointer?) -> Void) {
        on(object) { $0.withRequestHeader(nameBytes: nameBytes, body) }
    }

    override func withRequestHeaderClearing(_ object: UnsafeMutableRawPointer, _ name: String,
                                            _ body: (UnsafeRawBufferPointer?) -> Void) {
        on(object) { $0.withRequestHeaderClearing(name, body) }
    }
    override func setUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) {
        on(object) { $0.setUpstreamHeader(name, value) }
    }
    override func setUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String,
                                    nameBytes: UnsafeRawBufferPointer, valueBytes: UnsafeRawBufferPointer) {
        on(object) { $0.setUpstreamHeader(name, value, nameBytes: nameBytes, valueBytes: valueBytes) }
    }
    override func addUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) {
        on(object) { $0.addUpstreamHeader(name, value) }
    }
    override func clearUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String) { on(object) { $0.clearUpstreamHeader(name) } }
    override func setResponseHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) {
        on(object) { $0.setResponseHeader(name, value) }
    }
    override func addResponseHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) {
        on(object) { $0.addResponseHeader(name, value) }
    }
    override func clearResponseHeader(_ object: UnsafeMutableRawPointer, _ name: String) { on(object) { $0.clearResponseHeader(name) } }
    override func setResponseHeaders(_ object: UnsafeMutableRawPointer, _ lines: PreparedHeaderLines, _ wire: UnsafeRawBufferPointer) {
        on(object) { $0.setResponseHeaders(lines, wire: wire) }
    }
    override func identify(_ object: UnsafeMutableRawPointer, _ consumer: String, _ credential: String?, nameFits: Bool, anonymous: Bool) {
        on(object) { $0.identify(consumer: consumer, credential: credential, nameFits: nameFits, anonymous: anonymous) }
    }
    override func rawQuery(_ object: UnsafeMutableRawPointer) -> String? { on(object) { $0.rawQuery } }
    override func matchedRouteName(_ object: UnsafeMutableRawPointer) -> String? { on(object) { $0.matchedRouteName } }
    override func consumer(_ object: UnsafeMutableRawPointer) -> String? { on(object) { $0.consumer } }
}

extension ExchangePlugins {
    var nativeCalls: PluginRequestCalls { ExchangePluginsCalls.shared }
}
