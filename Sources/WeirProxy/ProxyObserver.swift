import WeirCore

/// One finished request, as the access log and the metrics see it.
/// Built on the event loop when the response's last byte has been written.
public struct AccessRecord: Sendable {
    /// Wall-clock start, seconds since 1970.
    public var startTime: Double
    public var requestID: String
    public var listener: String
    public var clientAddress: String
    public var method: String
    public var path: String
    /// Route name, or nil when no route matched (404).
    public var route: String?
    public var upstream: String?
    /// "host:port" of the target the final attempt went to.
    public var upstreamTarget: String?
    public var status: Int
    public var bytesIn: Int
    public var bytesOut: Int
    /// Seconds from first request byte to last response byte.
    public var totalDuration: Double
    /// Seconds spent waiting on the upstream (connect to last byte), if any.
    public var upstreamDuration: Double?
    public var attempts: Int
    /// The connection's TLS session (https listeners); nil on plain connections.
    public var tls: TLSConnectionInfo? = nil

    public init(startTime: Double, requestID: String, listener: String, clientAddress: String,
                method: String, path: String, route: String?, upstream: String?, upstreamTarget: String?,
                status: Int, bytesIn: Int, bytesOut: Int, totalDuration: Double,
                upstreamDuration: Double?, attempts: Int, tls: TLSConnectionInfo? = nil) {
        self.startTime = startTime; self.requestID = requestID; self.listener = listener
        self.clientAddress = clientAddress; self.method = method; self.path = path
        self.route = route; self.upstream = upstream; self.upstreamTarget = upstreamTarget
        self.status = status; self.bytesIn = bytesIn; self.bytesOut = bytesOut
        self.totalDuration = totalDuration; self.upstreamDuration = upstreamDuration
        self.attempts = attempts
        self.tls = tls
    }
}

/// What metrics need of a finished request (no per-request strings: the
/// route and upstream names are the config's own).
public struct RequestSample: Sendable {
    public var route: String?
    public var upstream: String?
    public var status: Int
    public var bytesIn: Int
    public var bytesOut: Int
    public var totalDuration: Double
    public var upstreamDuration: Double?

    public init(route: String?, upstream: String?, status: Int, bytesIn: Int, bytesOut: Int,
                totalDuration: Double, upstreamDuration: Double?) {
        self.route = route; self.upstream = upstream; self.status = status
        self.bytesIn = bytesIn; self.bytesOut = bytesOut
        self.totalDuration = totalDuration; self.upstreamDuration = upstreamDuration
    }
}

/// What the data path reports to the outside (access log, metrics).
/// Called on event loops: implementations must be cheap and never block.
public protocol ProxyObserver: AnyObject, Sendable {
    /// False when only a `RequestSample` is needed per request (metrics
    /// without an access log): the data path then calls `requestCounted`
    /// and builds no `AccessRecord` (a dozen strings copied and released,
    /// ~1.5k instructions per request under callgrind). Default true.
    /// Read once per listener (`ListenerRuntime`): it must not change.
    var wantsAccessRecords: Bool { get }
    func requestCompleted(_ record: AccessRecord)
    /// A finished request when `wantsAccessRecords` is false.
    func requestCounted(_ sample: RequestSample)
    /// When `wantsAccessRecords` is false: a counter that takes the
    /// requests of (route, upstream) recorded on the calling thread, kept
    /// by the caller (per event loop and route) in place of a
    /// `requestCounted` call per request. nil (the default): every request
    /// goes to `requestCounted`.
    func requestCounter(route: String?, upstream: String?) -> RequestCounter?
    func connectionOpened(listener: String)
    func connectionClosed(listener: String)
    /// tcp/tls listeners (defaults below do nothing).
    func streamCounters(listener: String, upstream: String?) -> StreamCounters?
    func streamCompleted(_ record: StreamRecord)
}

extension ProxyObserver {
    public var wantsAccessRecords: Bool { true }
    public func requestCounted(_ sample: RequestSample) {
        requestCompleted(AccessRecord(
            startTime: 0, requestID: "", listener: "", clientAddress: "", method: "", path: "",
            route: sample.route, upstream: sample.upstream, upstreamTarget: nil, status: sample.status,
            bytesIn: sample.bytesIn, bytesOut: sample.bytesOut, totalDuration: sample.totalDuration,
            upstreamDuration: sample.upstreamDuration, attempts: 0))
    }
    public func requestCounter(route: String?, upstream: String?) -> RequestCounter? { nil }
    /// tcp/tls listeners: the live byte and outcome counters for
    /// (listener, upstream), looked up once per connection; nil = none kept.
    public func streamCounters(listener: String, upstream: String?) -> StreamCounters? { nil }
    /// A tcp/tls connection ended (access log).
    public func streamCompleted(_ record: StreamRecord) {}
}
