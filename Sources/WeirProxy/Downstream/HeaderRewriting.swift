/// What the client's request head says about its body, as the exchange
/// needs it. The header rewriting itself is edit lists over the wire heads:
/// `ExchangeDownstream.upstreamEdits` (request), the downstreams'
/// `relayWireResponseHead` (response), with plugins' edits from
/// `Plugins/PluginHeadEdits.swift`.
enum HeaderRewriting {
    /// What the client's head says about its body.
    struct RequestFraming {
        var chunked = false
        var contentLength: Int? = nil
        var expectsContinue = false
        var teTrailers = false
        var hasBody: Bool { chunked || (contentLength ?? 0) > 0 }
    }
}

extension Substring {
    func trimmingASCIISpaces() -> Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }
}
