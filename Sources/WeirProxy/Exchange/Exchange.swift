import NIOCore
import NIOHTTP1
import WeirCore

/// One request going through the proxy.
///
/// An HTTP/1.1 connection reuses its finished exchange for its next
/// request when nothing else holds it (`DownstreamHandler.keepForReuse`):
/// `clearForReuse` then `begin` instead of a release and an allocation per
/// request (~350 instructions, BENCHMARKS.md core5). Every stored property
/// is reset in `clearForReuse` (`ExchangeReuseTests` fails when one is
/// added without it).
final class Exchange {
    /// The request id (X-Request-Id), written into the upstream head as
    /// bytes; `id` makes its String when something asks (logs, plugins).
    private(set) var requestID: RequestID
    private var idString: String?
    private(set) var head: RequestHead?
    /// When the exchange began: the loop's cached time of the read that
    /// brought its head (`LoopClock`).
    private(set) var started: NIODeadline
    /// Wall-clock seconds at `started`; set only when an access record may
    /// be built (access log, plugins): see `makeExchange`.
    var wallStart: Double = 0
    var routed: RoutedRequest?
    /// The request's plugin scope when its route has plugins.
    var plugins: ExchangePlugins?
    /// The client's Host (or the authority of an absolute-form target).
    var hostHeader: String?
    var framing = HeaderRewriting.RequestFraming()
    var maxBody: Int?
    var isUpgrade = false
    var upgraded = false
    var bodyless = false
    var keepAlive = true
    var upstreamKeepAlive = false

    /// The upstream head: the client's head bytes plus these edits (the
    /// proxy's, then any plugin's), written by range copy.
    var upstreamEdits: HTTP1HeadEdits?
    /// The client's response body is written chunk-framed.
    var responseChunked = false
    var target: Int?
    var attempts = 0
    var balancerActive = false
    var connection: UpstreamConnection?
    var connectionReused = false
    var staleRetried = false
    /// Parts received before the upstream connection was ready (at most one
    /// read's worth: the client is not read while connecting).
    var pendingUpstream: [HTTPClientRequestPart] = []
    var upstreamNeedsFlush = false
    /// Set by `weir.upstream.request.set_body`: forwarded instead of the
    /// client's body, which is then read and dropped.
    var replacementBody: ByteBuffer?

    var requestEnded = false
    var bodyForwarded = false
    var discardingBody = false
    var responseStarted = false
    var localResponseDone = false
    var upstreamResponseEnded = false
    var finished = false
    var status = 0
    var bytesIn = 0
    var bytesOut = 0

    var upstreamStart: NIODeadline?
    var requestSentAt: NIODeadline?
    var lastUpstreamRead: NIODeadline = .uptimeNanoseconds(0)
    var writeBlockedSince: NIODeadline?
    /// The gRPC facts of the request, read on first use (proxy errors and
    /// HTTP/2 upstreams' deadlines only): nil until then.
    private var grpcLookup: GRPCRequestInfo??

    init(requestID: RequestID, head: RequestHead?, started: NIODeadline) {
        self.requestID = requestID
        self.head = head
        self.started = started
    }

    /// The request id as a String, made on first use.
    var id: String {
        if let idString { return idString }
        let made = requestID.string
        idString = made
        return made
    }

    /// Set when the request is gRPC.
    var grpc: GRPCRequestInfo? {
        if let grpcLookup { return grpcLookup }
        let info = head.flatMap { GRPCRequestInfo(headers: $0.headers) }
        grpcLookup = .some(info)
        return info
    }

    /// A reused exchange's next request (after `clearForReuse`).
    func begin(requestID: RequestID, head: RequestHead?, started: NIODeadline) {
        self.requestID = requestID
        self.head = head
        self.started = started
    }

    /// Every stored property back to its initial value, as `init` leaves
    /// it, and every reference released (the request head with its bytes,
    /// the route, the upstream connection): called as soon as the finished
    /// exchange is known to be held by nobody else, so nothing lives on
    /// in it until the next request.
    func clearForReuse() {
        idString = nil
        head = nil
        wallStart = 0
        routed = nil
        plugins = nil
        hostHeader = nil
        framing = HeaderRewriting.RequestFraming()
        maxBody = nil
        isUpgrade = false
        upgraded = false
        bodyless = false
        keepAlive = true
        upstreamKeepAlive = false
        upstreamEdits = nil
        responseChunked = false
        target = nil
        attempts = 0
        balancerActive = false
        connection = nil
        connectionReused = false
        staleRetried = false
        pendingUpstream = []
        upstreamNeedsFlush = false
        replacementBody = nil
        requestEnded = false
        bodyForwarded = false
        discardingBody = false
        responseStarted = false
        localResponseDone = false
        upstreamResponseEnded = false
        finished = false
        status = 0
        bytesIn = 0
        bytesOut = 0
        upstreamStart = nil
        requestSentAt = nil
        lastUpstreamRead = .uptimeNanoseconds(0)
        writeBlockedSince = nil
        grpcLookup = nil
    }
}
