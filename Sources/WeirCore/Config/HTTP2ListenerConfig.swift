// The HTTP/2 part of an http/https listener: limits and abuse protection
// for downstream HTTP/2 (h2c with prior knowledge on `http` listeners, h2
// over TLS via ALPN on `https` ones). Read by `ConfigReader.readHTTP2`.
//
//   listeners:
//     - name: web
//       listen: 127.0.0.1:8080
//       http2:
//         enabled: true                 # h2c prior knowledge / ALPN h2 (default true)
//         max_concurrent_streams: 100   # SETTINGS_MAX_CONCURRENT_STREAMS; more: RST_STREAM REFUSED_STREAM
//         max_header_list_size: 16k     # SETTINGS_MAX_HEADER_LIST_SIZE; a request head over it: 431
//         max_continuation_frames: 5    # CONTINUATION frames allowed before END_HEADERS (flood guard)
//         initial_window_size: 64k      # per-stream receive window (backpressure per stream)
//         connection_window_size: 1m    # connection receive window
//         max_frame_size: 16k           # SETTINGS_MAX_FRAME_SIZE we accept
//         max_resets: 200               # RST_STREAMs from the client per reset_window (Rapid Reset) ...
//         reset_window: 30s             # ... above it: GOAWAY ENHANCE_YOUR_CALM and close
//         max_glitches: 200             # malformed requests and invalid frames allowed; the next: GOAWAY
//         idle_timeout: 5m              # no open stream for this long: GOAWAY NO_ERROR and close
//         ping_interval: 60s            # nothing read for this long: send a PING (0 = never)
//         ping_timeout: 20s             # no PING ACK in time: close

import Yams

/// Downstream HTTP/2 settings of an http/https listener.
public struct HTTP2ListenerSettings: Hashable, Sendable {
    public var enabled = true
    public var maxConcurrentStreams = 100
    public var maxHeaderListSize = 16 * 1024
    public var maxContinuationFrames = 5
    public var initialWindowSize = 65_535
    public var connectionWindowSize = 1024 * 1024
    public var maxFrameSize = 16_384
    public var maxResets = 200
    public var resetWindow: TimeSpan = .seconds(30)
    public var maxGlitches = 200
    public var idleTimeout: TimeSpan = .seconds(300)
    /// nil: no keep-alive PINGs are sent.
    public var pingInterval: TimeSpan? = .seconds(60)
    public var pingTimeout: TimeSpan = .seconds(20)
    public init() {}
}

extension ConfigReader {
    static let http2Keys = ["enabled", "max_concurrent_streams", "max_header_list_size", "max_continuation_frames",
                            "initial_window_size", "connection_window_size", "max_frame_size", "max_resets",
                            "reset_window", "max_glitches", "idle_timeout", "ping_interval", "ping_timeout"]

    /// `http2:` of a listener (http and https listeners only).
    func readHTTP2(_ node: Node, _ path: String, protocol proto: ListenerProtocol) -> HTTP2ListenerSettings {
        var s = HTTP2ListenerSettings()
        guard proto == .http || proto == .https else {
            report(path, "only applies to http and https listeners (this one is \(proto.rawValue))", node)
            return s
        }
        guard let f = fields(node, path, known: Self.http2Keys) else { return s }
        if let n = f["enabled"] { s.enabled = bool(n, f.path("enabled")) ?? s.enabled }
        // RFC 9113 §6.5.2: at least 1 stream makes sense; 2^31-1 is the field's range.
        if let n = f["max_concurrent_streams"] {
            s.maxConcurrentStreams = int(n, f.path("max_concurrent_streams"), min: 1, max: 1 << 20) ?? s.maxConcurrentStreams
        }
        if let n = f["max_header_list_size"] {
            s.maxHeaderListSize = boundedSize(n, f.path("max_header_list_size"), min: 1024, max: 1 << 20) ?? s.maxHeaderListSize
        }
        if let n = f["max_continuation_frames"] {
            s.maxContinuationFrames = int(n, f.path("max_continuation_frames"), min: 0, max: 1000) ?? s.maxContinuationFrames
        }
        // RFC 9113 §6.9.2: windows above 2^31-1 are a FLOW_CONTROL_ERROR.
        if let n = f["initial_window_size"] {
            s.initialWindowSize = boundedSize(n, f.path("initial_window_size"), min: 1024, max: Int(Int32.max)) ?? s.initialWindowSize
        }
        if let n = f["connection_window_size"] {
            s.connectionWindowSize = boundedSize(n, f.path("connection_window_size"), min: 65_535, max: Int(Int32.max)) ?? s.connectionWindowSize
        }
        // RFC 9113 §6.5.2: SETTINGS_MAX_FRAME_SIZE is between 2^14 and 2^24-1.
        if let n = f["max_frame_size"] {
            s.maxFrameSize = boundedSize(n, f.path("max_frame_size"), min: 16_384, max: (1 << 24) - 1) ?? s.maxFrameSize
        }
        if let n = f["max_resets"] { s.maxResets = int(n, f.path("max_resets"), min: 1) ?? s.maxResets }
        if let n = f["reset_window"] { s.resetWindow = duration(n, f.path("reset_window")) ?? s.resetWindow }
        if let n = f["max_glitches"] { s.maxGlitches = int(n, f.path("max_glitches"), min: 1) ?? s.maxGlitches }
        if let n = f["idle_timeout"] { s.idleTimeout = duration(n, f.path("idle_timeout")) ?? s.idleTimeout }
        if let n = f["ping_interval"] {
            if case .scalar(let scalar) = n, scalar.string == "0" {
                s.pingInterval = nil
            } else {
                s.pingInterval = duration(n, f.path("ping_interval")) ?? s.pingInterval
            }
        }
        if let n = f["ping_timeout"] { s.pingTimeout = duration(n, f.path("ping_timeout")) ?? s.pingTimeout }
        return s
    }

    private func boundedSize(_ node: Node, _ path: String, min: Int, max: Int) -> Int? {
        guard let value = size(node, path, min: min) else { return nil }
        guard value <= max else {
            report(path, "must be at most \(max) bytes", node)
            return nil
        }
        return value
    }
}
