import NIOCore
import NIOHTTP1
import WeirCore

/// One request going through the proxy.
final class Exchange {
    /// The request id (X-Request-Id), written into the upstream head as
    /// bytes; `id` makes its String when something asks (logs, plugins).
    let requestID: RequestID
    private(set) lazy var id: String = requestID.string
    let head: RequestHead?
    /// When the exchange began: the loop's cached time of the read that
    /// brought its head (`LoopClock`).
    let started: NIODeadline
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
    /// Set when the request is gRPC (read on first use: proxy errors and
    /// HTTP/2 upstreams' deadlines only).
    lazy var grpc: GRPCRequestInfo? = head.flatMap { GRPCRequestInfo(headers: $0.headers) }

    init(requestID: RequestID, head: RequestHead?, started: NIODeadline) {
        self.requestID = requestID
        self.head = head
        self.started = started
    }
}
