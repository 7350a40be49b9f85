/// What the client's request head says about its body, as the exchange
/// needs it. The header rewriting itself is edit lists over the wire heads:
/// `UpstreamOwnFields` (request no plugin touched) or
/// `ExchangeDownstream.upstreamEdits` (a plugin read or edited it), the downstreams'
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

    /// This hop's Via entry (RFC 9110 §7.6.3): the protocol version the
    /// message was received with (the client's for a request, the
    /// upstream's for a response) and the pseudonym "weir". Literals: no
    /// String is built per request.
    static func viaEntry(http2: Bool, http10: Bool) -> String {
        http2 ? "2 weir" : (http10 ? "1.0 weir" : "1.1 weir")
    }

    /// The same entry as bytes, for heads written by range copy.
    static func viaEntryLiteral(http2: Bool, http10: Bool) -> StaticString {
        http2 ? "2 weir" : (http10 ? "1.0 weir" : "1.1 weir")
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
