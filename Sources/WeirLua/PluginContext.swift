import NIOCore
import WeirCore

/// The plugin phases, in the order a request meets them.
public enum PluginPhase: String, CaseIterable, Sendable {
    case connection, request, response
    case bodyFilter = "body_filter"
    case log
    /// A `weir.timer.at/every` callback (not a handler phase).
    case timer

    /// The id the Lua SDK uses for phase checks (lua/weir/init.lua).
    var luaID: Int {
        switch self {
        case .connection: return 1
        case .request: return 2
        case .response: return 3
        case .bodyFilter: return 4
        case .log: return 5
        case .timer: return 6
        }
    }
    /// Size of arrays indexed by luaID.
    static let slotCount = 7

    /// This phase's bit in a phase mask (`1 << luaID`), as natives check it.
    /// Inlined, without the conversion's overflow check (luaID is 1...6):
    /// an outlined getter was a call per hot native call.
    @inline(__always)
    var mask: UInt8 { 1 &<< UInt8(truncatingIfNeeded: luaID) }
    /// The request, response, body_filter and log phases (init.lua's ANY_REQUEST_PHASE).
    static let anyRequestPhase = PluginPhase.request.mask | PluginPhase.response.mask
        | PluginPhase.bodyFilter.mask | PluginPhase.log.mask
    /// The request and response phases (init.lua's RESPONSE_WRITE_PHASES).
    static let responseWritePhases = PluginPhase.request.mask | PluginPhase.response.mask

    /// Whether a chain's plugins run in one resume through the C chain
    /// runner (CLuaShims/chain.c). The connection phase (a conn handle made
    /// per call) and timers (one function) start one call per resume.
    var runsChainInOneResume: Bool { self != .connection && self != .timer }
}

/// One request as plugins see it. Implemented by the proxy for each
/// request and used only on that request's event loop. Accessors are called
/// lazily, only when a plugin asks (`weir.request.get_header` calls
/// `requestHeader`), so nothing is copied into Lua up front.
///
/// Header names passed in are lower-cased by the runtime. The header
/// setters (`set…Header`, `add…Header`) get only names that are tokens and
/// values without CR, LF or NUL: the runtime checks them (once per Lua
/// string) and drops or clears instead (see SDKNatives' `HeaderChange`), so
/// an implementation can write them into a head as they are.
public protocol PluginRequestContext: AnyObject {
    var requestID: String { get }

    // The downstream request, as received.
    var method: String { get }
    var path: String { get }
    var rawQuery: String? { get }
    var scheme: String { get }
    var host: String? { get }
    func requestHeader(_ lowercasedName: String) -> String?
    /// The first value of a header as bytes, handed to `body` (nil when
    /// absent): `weir.request.get_header` copies them into a Lua string
    /// without making a Swift String first.
    func withRequestHeader(_ lowercasedName: String, _ body: (UnsafeRawBufferPointer?) -> Void)
    func requestHeaders() -> [(name: String, value: String)]
    /// Reads the request body, buffering at most `maxBytes` (nil = no body).
    /// The future must complete on the request's event loop.
    func readRequestBody(maxBytes: Int) -> EventLoopFuture<[UInt8]?>

    // The client (downstream peer).
    var clientIP: String { get }
    var clientPort: Int { get }
    /// The connection's TLS session (default nil: plain connection).
    var tls: TLSConnectionInfo? { get }
    var consumer: String? { get }
    /// The name of the route the request matched (`weir.request.get_route`);
    /// nil when it matched none or the route has no name.
    var matchedRouteName: String? { get }
    /// Marks the request as made by `consumer` (an auth plugin succeeded).
    func authenticate(consumer: String, credential: String?)
    /// `weir.client.identify`: `authenticate`, then the upstream request's
    /// X-Consumer-Name set to the consumer (only cleared when `nameFits` is
    /// false: not a valid header value) and X-Anonymous-Consumer set to
    /// "true" (`anonymous`) or cleared. The default does exactly those
    /// calls; the proxy makes both header changes in one go.
    func identify(consumer: String, credential: String?, nameFits: Bool, anonymous: Bool)

    // Changes to the request sent upstream (request phase).
    func setUpstreamHeader(_ lowercasedName: String, _ value: String)
    func addUpstreamHeader(_ lowercasedName: String, _ value: String)
    func clearUpstreamHeader(_ lowercasedName: String)
    func setUpstreamPath(_ path: String)
    func setUpstreamQuery(_ query: String?)
    func setUpstreamMethod(_ method: String)
    /// The request as it will be sent upstream so far (after earlier
    /// plugins' changes): its headers and its query string ("" = none).
    func upstreamRequestHeaders() -> [(name: String, value: String)]
    var upstreamRawQuery: String { get }
    func setUpstreamBody(_ body: [UInt8])
    /// Pins this request to a configured target (host and port as written
    /// in the config); false, and nothing changes, for any other address.
    func setUpstreamTarget(host: String, port: Int) -> Bool
    /// Switches to another configured upstream; false if no such upstream.
    func setUpstream(named name: String) -> Bool
    /// Seconds; nil leaves that timeout unchanged.
    func setUpstreamTimeouts(connect: Double?, send: Double?, read: Double?)
    func setUpstreamRetries(_ retries: Int)

    // The response (response phase reads the upstream's; request phase may
    // add headers to whatever response is eventually sent).
    var responseStatus: Int? { get }
    func setResponseStatus(_ status: Int)
    func responseHeader(_ lowercasedName: String) -> String?
    func responseHeaders() -> [(name: String, value: String)]
    func setResponseHeader(_ lowercasedName: String, _ value: String)
    func addResponseHeader(_ lowercasedName: String, _ value: String)
    func clearResponseHeader(_ lowercasedName: String)
    /// `prepared:set(...)`: `setResponseHeader` of each of the prepared
    /// lines in order; `wire` is those lines as written (`name: value\r\n`
    /// each, names and values checked: `PreparedHeaderLines.forEachLine(inWire:)`).
    /// The default does exactly that; the proxy adds them at once.
    func setResponseHeaders(_ lines: PreparedHeaderLines, wire: UnsafeRawBufferPointer)

    /// The finished request's access record (log phase); nil outside the
    /// data path. Built on demand (`weir.log.serialize()`).
    func accessRecord() -> PluginAccessRecord?

    /// How the hot natives call this context without retaining it (default:
    /// through the existential; see `PluginRequestCalls`). Must be a
    /// long-lived (static) object: the scope keeps it unretained.
    var nativeCalls: PluginRequestCalls { get }
}

/// How the runtime's hot natives (SDKNatives.swift, `HotNative`) call a
/// request context without retaining it: a call on the
/// `PluginRequestContext` existential read from the scope retains and
/// releases it (~40 instructions per native call), whatever way it is
/// stored; `Unmanaged` borrows only a concrete class. So a context type
/// may hand out a subclass whose methods take the context as its
/// unretained object pointer and call the concrete type (the proxy's
/// `ExchangePluginsCalls`); this base class, every other context's, goes
/// through the existential.
open class PluginRequestCalls {
    public init() {}
    /// The calls through the existential (contexts without their own).
    public static let existential = PluginRequestCalls()

    open func withRequestHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        context(object).withRequestHeader(name, body)
    }
    /// `withRequestHeader` with `name`'s UTF-8 bytes too (valid during the
    /// call only), for a context that looks them up as they are.
    open func withRequestHeader(_ object: UnsafeMutableRawPointer, _ name: String, nameBytes: UnsafeRawBufferPointer,
                                _ body: (UnsafeRawBufferPointer?) -> Void) {
        context(object).withRequestHeader(name, body)
    }

    /// `withRequestHeader` then `clearUpstreamHeader` of the same name (a
    /// context may do both in one pass: the proxy's `ExchangePluginsCalls`).
    open func withRequestHeaderClearing(_ object: UnsafeMutableRawPointer, _ name: String,
                                        _ body: (UnsafeRawBufferPointer?) -> Void) {
        context(object).withRequestHeader(name, body)
        context(object).clearUpstreamHeader(name)
    }
    open func setUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) { context(object).setUpstreamHeader(name, value) }
    /// `setUpstreamHeader` with `name`'s and `value`'s UTF-8 bytes too
    /// (valid during the call only), for a context that writes them as they are.
    open func setUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String,
                                nameBytes: UnsafeRawBufferPointer, valueBytes: UnsafeRawBufferPointer) {
        context(object).setUpstreamHeader(name, value)
    }
    open func addUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) { context(object).addUpstreamHeader(name, value) }
    open func clearUpstreamHeader(_ object: UnsafeMutableRawPointer, _ name: String) { context(object).clearUpstreamHeader(name) }
    open func setResponseHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) { context(object).setResponseHeader(name, value) }
    open func addResponseHeader(_ object: UnsafeMutableRawPointer, _ name: String, _ value: String) { context(object).addResponseHeader(name, value) }
    open func clearResponseHeader(_ object: UnsafeMutableRawPointer, _ name: String) { context(object).clearResponseHeader(name) }
    open func setResponseHeaders(_ object: UnsafeMutableRawPointer, _ lines: PreparedHeaderLines, _ wire: UnsafeRawBufferPointer) {
        context(object).setResponseHeaders(lines, wire: wire)
    }
    open func identify(_ object: UnsafeMutableRawPointer, _ consumer: String, _ credential: String?, nameFits: Bool, anonymous: Bool) {
        context(object).identify(consumer: consumer, credential: credential, nameFits: nameFits, anonymous: anonymous)
    }
    open func rawQuery(_ object: UnsafeMutableRawPointer) -> String? { context(object).rawQuery }
    open func matchedRouteName(_ object: UnsafeMutableRawPointer) -> String? { context(object).matchedRouteName }
    open func consumer(_ object: UnsafeMutableRawPointer) -> String? { context(object).consumer }

    private func context(_ object: UnsafeMutableRawPointer) -> PluginRequestContext {
        Unmanaged<AnyObject>.fromOpaque(object).takeUnretainedValue() as! PluginRequestContext
    }
}

/// The upstream request lines `weir.client.identify` sets (lower-case).
public enum PluginIdentityFields {
    // Computed and inlinable: each use is the literal, made in place. A
    // stored `static let` was read through its addressor and retained and
    // released at each use (identify: ~30 instructions a name per request).
    @inlinable public static var consumerName: String { "x-consumer-name" }
    @inlinable public static var anonymousConsumer: String { "x-anonymous-consumer" }
    /// Their lengths (identify_header_credential compares a name's length
    /// with them: an Int read, where loading a name costs a retain).
    static let consumerNameLength = consumerName.utf8.count
    static let anonymousConsumerLength = anonymousConsumer.utf8.count
}

/// A scope's request context for the hot natives: the object, unretained
/// (the scope's `context` holds it), and its `PluginRequestCalls`. Plain
/// values: reading them from the scope retains nothing.
struct HotRequestContext {
    let object: UnsafeMutableRawPointer
    let calls: Unmanaged<PluginRequestCalls>

    init?(_ context: PluginRequestContext?) {
        guard let context else { return nil }
        object = Unmanaged.passUnretained(context as AnyObject).toOpaque()
        // The calls objects are static (immortal).
        calls = Unmanaged.passUnretained(context.nativeCalls)
    }

    @inline(__always) func withRequestHeader(_ name: String, nameBytes: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer?) -> Void) {
        calls._withUnsafeGuaranteedRef { $0.withRequestHeader(object, name, nameBytes: nameBytes, body) }
    }
    @inline(__always) func withRequestHeader(_ name: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        calls._withUnsafeGuaranteedRef { $0.withRequestHeader(object, name, body) }
    }
    @inline(__always) func withRequestHeaderClearing(_ name: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        calls._withUnsafeGuaranteedRef { $0.withRequestHeaderClearing(object, name, body) }
    }
    @inline(__always) func setUpstreamHeader(_ name: String, _ value: String) {
        calls._withUnsafeGuaranteedRef { $0.setUpstreamHeader(object, name, value) }
    }
    @inline(__always) func setUpstreamHeader(_ name: String, _ value: String,
                                             nameBytes: UnsafeRawBufferPointer, valueBytes: UnsafeRawBufferPointer) {
        calls._withUnsafeGuaranteedRef { $0.setUpstreamHeader(object, name, value, nameBytes: nameBytes, valueBytes: valueBytes) }
    }
    @inline(__always) func addUpstreamHeader(_ name: String, _ value: String) {
        calls._withUnsafeGuaranteedRef { $0.addUpstreamHeader(object, name, value) }
    }
    @inline(__always) func clearUpstreamHeader(_ name: String) { calls._withUnsafeGuaranteedRef { $0.clearUpstreamHeader(object, name) } }
    @inline(__always) func setResponseHeader(_ name: String, _ value: String) {
        calls._withUnsafeGuaranteedRef { $0.setResponseHeader(object, name, value) }
    }
    @inline(__always) func addResponseHeader(_ name: String, _ value: String) {
        calls._withUnsafeGuaranteedRef { $0.addResponseHeader(object, name, value) }
    }
    @inline(__always) func clearResponseHeader(_ name: String) { calls._withUnsafeGuaranteedRef { $0.clearResponseHeader(object, name) } }
    @inline(__always) func setResponseHeaders(_ lines: PreparedHeaderLines, _ wire: UnsafeRawBufferPointer) {
        calls._withUnsafeGuaranteedRef { $0.setResponseHeaders(object, lines, wire) }
    }
    @inline(__always) func identify(_ consumer: String, _ credential: String?, nameFits: Bool, anonymous: Bool) {
        calls._withUnsafeGuaranteedRef { $0.identify(object, consumer, credential, nameFits: nameFits, anonymous: anonymous) }
    }
    @inline(__always) var rawQuery: String? { calls._withUnsafeGuaranteedRef { $0.rawQuery(object) } }
    @inline(__always) var matchedRouteName: String? { calls._withUnsafeGuaranteedRef { $0.matchedRouteName(object) } }
    @inline(__always) var consumer: String? { calls._withUnsafeGuaranteedRef { $0.consumer(object) } }
}

extension PluginRequestContext {
    /// Through the existential (see `PluginRequestCalls`).
    public var nativeCalls: PluginRequestCalls { PluginRequestCalls.existential }
    /// The three calls it stands for (see the requirement).
    public func identify(consumer: String, credential: String?, nameFits: Bool, anonymous: Bool) {
        authenticate(consumer: consumer, credential: credential)
        if nameFits { setUpstreamHeader(PluginIdentityFields.consumerName, consumer) } else { clearUpstreamHeader(PluginIdentityFields.consumerName) }
        if anonymous {
            setUpstreamHeader(PluginIdentityFields.anonymousConsumer, "true")
        } else {
            clearUpstreamHeader(PluginIdentityFields.anonymousConsumer)
        }
    }
    /// Contexts outside a routed request (tests, tools) have no route.
    public var matchedRouteName: String? { nil }
    /// The connection's TLS session (`weir.client.get_tls()`); nil on plain connections.
    public var tls: TLSConnectionInfo? { nil }
    /// Contexts that do not build an upstream request: it is the downstream one.
    public func upstreamRequestHeaders() -> [(name: String, value: String)] { requestHeaders() }
    public var upstreamRawQuery: String { rawQuery ?? "" }
    public func accessRecord() -> PluginAccessRecord? { nil }
    public func setResponseHeaders(_ lines: PreparedHeaderLines, wire: UnsafeRawBufferPointer) {
        PreparedHeaderLines.forEachLine(inWire: wire) { setResponseHeader($0, $1) }
    }
    /// Through `requestHeader` (contexts whose headers are Strings anyway).
    public func withRequestHeader(_ lowercasedName: String, _ body: (UnsafeRawBufferPointer?) -> Void) {
        guard var value = requestHeader(lowercasedName) else { return body(nil) }
        value.withUTF8 { body(UnsafeRawBufferPointer($0)) }
    }
}

/// One downstream connection as the connection phase sees it.
public protocol PluginConnectionContext: AnyObject {
    var connectionID: String { get }
    var clientIP: String { get }
    var clientPort: Int { get }
    /// TLS server name the client asked for, if any.
    var serverName: String? { get }
    /// ALPN protocols the client offered (TLS passthrough: from its
    /// ClientHello, in its order); empty when unknown or none.
    var offeredALPN: [String] { get }
    /// The port the connection was accepted on; nil when unknown.
    var localPort: Int? { get }
    /// The name of the listener that accepted the connection.
    var listenerName: String? { get }
    /// tcp/tls listeners: sends the connection to the named upstream
    /// (`weir.upstream.set_upstream` in the connection phase). Returns
    /// nil on success, else why not ("no upstream named ...", or the
    /// listener is not an L4 one).
    func chooseUpstream(named name: String) -> String?
    /// The connection's TLS session (https listeners, after the handshake);
    /// nil on plain connections and TLS passthrough.
    var tls: TLSConnectionInfo? { get }
}

extension PluginConnectionContext {
    public var offeredALPN: [String] { [] }
    public var localPort: Int? { nil }
    public var listenerName: String? { nil }
    public func chooseUpstream(named name: String) -> String? {
        "weir.upstream.set_upstream in the connection phase only applies to tcp and tls listeners"
    }
    public var tls: TLSConnectionInfo? { nil }
}

/// What a phase run ended with.
public enum PhaseResult: Equatable {
    /// Every plugin ran; carry on.
    case `continue`
    /// A plugin ended the request with this response (or, in the connection
    /// phase, rejected the connection: status 403 and the reason as body).
    case exit(PluginExit)
    /// A plugin raised (or ran out of budget/memory). The proxy answers 500
    /// with the request id; the worker carries on.
    case failed(PluginFailure)
}

public struct PluginExit: Equatable, Sendable {
    public var status: Int
    public var body: [UInt8]?
    /// In order; a name may repeat.
    public var headers: [HeaderField]
    public var bodyString: String? { body.map { String(decoding: $0, as: UTF8.self) } }
    public init(status: Int, body: [UInt8]?, headers: [HeaderField]) {
        self.status = status; self.body = body; self.headers = headers
    }
}

public struct HeaderField: Equatable, Sendable {
    public var name: String
    public var value: String
    public init(_ name: String, _ value: String) { self.name = name; self.value = value }
}

public struct PluginFailure: Error, Equatable, Sendable, CustomStringConvertible {
    public var plugin: String
    public var phase: PluginPhase
    public var message: String
    public var traceback: String?
    public var description: String { "plugin \(plugin) failed in the \(phase.rawValue) phase: \(message)" }
}

/// A log line written by a plugin through `weir.log`.
public struct PluginLogRecord: Sendable {
    public enum Level: Int, Sendable { case debug = 0, info, warn, error }
    public var level: Level
    public var plugin: String
    public var requestID: String?
    public var phase: PluginPhase?
    public var message: String
}
