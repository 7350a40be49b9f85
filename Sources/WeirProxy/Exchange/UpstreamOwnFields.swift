import NIOCore

/// The proxy's own lines of an upstream request head (Host, framing,
/// X-Forwarded-For/-Proto/-Host, Via, X-Request-Id), written as bytes after
/// the client's kept lines: the client's values that are carried on (a
/// trusted peer's X-Forwarded-*, every Via) are copied from its head, the
/// rest from Strings the proxy already holds. No String is joined and no
/// `HTTP1AddedField` made per request (as `HTTP1AddedField`s these lines
/// cost ~1.9 k instructions per request: BENCHMARKS.md, "fields").
///
/// Used while no plugin holds the upstream head's edit list
/// (`Exchange.upstreamEdits` nil, see `serializeUpstreamHead`): also on a
/// route with plugins until one reads or edits the upstream request. Those
/// edit the same lines as `HTTP1AddedField`s (`upstreamEdits`); both ways
/// write the same bytes, in the same order (UpstreamOwnFieldsTests).
struct UpstreamOwnFields {
    /// The client's lines not forwarded: hop-by-hop ones and the ones the
    /// proxy's own lines replace.
    private(set) var removed: HTTP1FieldSet
    let requestID: RequestID
    /// What the lines but X-Request-Id are written from; nil when the
    /// connection's memo holds this request's lines: the usual request
    /// never loads these Strings, so it neither retains nor releases them
    /// (and the struct's destroy has one nil to test, not four Strings).
    private let inputs: Inputs?
    /// The client's X-Forwarded-For lines (a trusted peer's only) and Via
    /// lines: how many, and their values' bytes plus a ", " after each.
    private var forwardedForLines = 0, forwardedForBytes = 0
    private var viaLines = 0, viaBytes = 0
    /// A trusted peer's first X-Forwarded-Proto / -Host line, or -1.
    private var forwardedProtoLine = -1
    private var forwardedHostLine = -1
    /// The connection's memo of these lines (nil: none kept); it holds
    /// exactly the lines this request gets when `inputs` is nil (see
    /// `UpstreamOwnLinesMemo`).
    private let memo: UpstreamOwnLinesMemo?

    /// The Strings and flags the lines are written from, when the memo
    /// does not hold them.
    struct Inputs {
        var host: String, chunked: Bool, upgrade: Bool, clientIP: String, scheme: String
        /// The client's Host (or absolute-form authority): X-Forwarded-Host
        /// unless a trusted peer sent one.
        var clientHost: String?, viaEntry: StaticString
    }

    /// `memoHolds` asks the connection's memo whether it holds this
    /// request's lines (only when they copy no client value); `inputs` is
    /// called only when it does not. Both are closures so that the caller's
    /// Strings are loaded only on a miss (passed as arguments, an init's
    /// are owned: retained by the caller, released by the init). Inlined,
    /// so the closures are too.
    @inline(__always)
    init(fields: HTTP1Fields, removed: HTTP1FieldSet, peerTrusted: Bool, requestID: RequestID,
         memo: UpstreamOwnLinesMemo, memoHolds: (UpstreamOwnLinesMemo) -> Bool, inputs: () -> Inputs) {
        self.removed = removed
        self.requestID = requestID
        for (i, e) in fields.entries.enumerated() {
            guard let line = ReplacedClientLine(e.known) else { continue }
            self.removed.insert(i)
            switch line {
            case .dropped:
                break
            case .forwardedFor:
                if peerTrusted { forwardedForLines += 1; forwardedForBytes += Int(e.valueLength) + 2 }
            case .forwardedProto:
                if peerTrusted && forwardedProtoLine < 0 { forwardedProtoLine = i }
            case .forwardedHost:
                if peerTrusted && forwardedHostLine < 0 { forwardedHostLine = i }
            case .via:
                viaLines += 1
                viaBytes += Int(e.valueLength) + 2
            }
        }
        // No value of the client's lines goes into these lines (no trusted
        // peer's X-Forwarded-*, no Via): they depend only on the inputs,
        // so they can be kept for the connection's next request.
        let copiesNoClientValues = forwardedForLines == 0 && forwardedProtoLine < 0 && forwardedHostLine < 0 && viaLines == 0
        if copiesNoClientValues && memoHolds(memo) {
            self.memo = memo
            self.inputs = nil
        } else {
            self.memo = copiesNoClientValues ? memo : nil
            self.inputs = inputs()
        }
    }

    /// What `write` writes, in bytes.
    func byteCount(_ entries: [HTTP1FieldEntry]) -> Int {
        guard let i = inputs else { return memo!.bytes.count + 14 + requestID.byteCount + 2 }
        let host = i.host, chunked = i.chunked, upgrade = i.upgrade, clientIP = i.clientIP, scheme = i.scheme
        let clientHost = i.clientHost, viaEntry = i.viaEntry
        var n = 6 + host.utf8.count + 2                                         // host: …\r\n
        if chunked { n += 28 }                                                  // transfer-encoding: chunked\r\n
        if upgrade { n += 21 }                                                  // connection: upgrade\r\n
        n += 17 + forwardedForBytes + clientIP.utf8.count + 2                   // x-forwarded-for: …\r\n
        n += 19 + (forwardedProtoLine >= 0 ? Int(entries[forwardedProtoLine].valueLength) : scheme.utf8.count) + 2
        if forwardedHostLine >= 0 {
            n += 18 + Int(entries[forwardedHostLine].valueLength) + 2
        } else if let clientHost {
            n += 18 + clientHost.utf8.count + 2
        }
        n += 5 + viaBytes + viaEntry.utf8CodeUnitCount + 2                       // via: …\r\n
        n += 14 + requestID.byteCount + 2                                      // x-request-id: …\r\n
        return n
    }

    /// The lines, in `upstreamEdits`' order; `src` is the client's head bytes.
    func write(_ w: inout HTTP1HeadWriter.RawWriter, _ entries: [HTTP1FieldEntry], _ src: UnsafeRawPointer) {
        if let i = inputs {
            let start = w.offset
            writeLinesThroughVia(&w, i, entries, src)
            memo?.keep(UnsafeRawBufferPointer(start: w.base + start, count: w.offset - start), of: i)
        } else {
            memo!.bytes.withUnsafeBytes { w.copy($0.baseAddress!, $0.count) }
        }
        w.copy("x-request-id: ")
        requestID.write(to: w.base + w.offset)
        w.offset += requestID.byteCount
        w.copy("\r\n")
    }

    /// Every line but X-Request-Id.
    private func writeLinesThroughVia(_ w: inout HTTP1HeadWriter.RawWriter, _ i: Inputs, _ entries: [HTTP1FieldEntry],
                                      _ src: UnsafeRawPointer) {
        let host = i.host, chunked = i.chunked, upgrade = i.upgrade, clientIP = i.clientIP, scheme = i.scheme
        let clientHost = i.clientHost, viaEntry = i.viaEntry
        w.copy("host: "); w.copy(host); w.copy("\r\n")
        if chunked { w.copy("transfer-encoding: chunked\r\n") }
        if upgrade { w.copy("connection: upgrade\r\n") }
        w.copy("x-forwarded-for: ")
        if forwardedForLines > 0 { copyValues(of: .xForwardedFor, &w, entries, src) }
        w.copy(clientIP)
        w.copy("\r\nx-forwarded-proto: ")
        if forwardedProtoLine >= 0 { copyValue(entries[forwardedProtoLine], &w, src) } else { w.copy(scheme) }
        w.copy("\r\n")
        if forwardedHostLine >= 0 {
            w.copy("x-forwarded-host: "); copyValue(entries[forwardedHostLine], &w, src); w.copy("\r\n")
        } else if let clientHost {
            w.copy("x-forwarded-host: "); w.copy(clientHost); w.copy("\r\n")
        }
        w.copy("via: ")
        if viaLines > 0 { copyValues(of: .via, &w, entries, src) }
        w.copy(viaEntry)
        w.copy("\r\n")
    }

    /// Every line's value of that kind, each followed by ", ".
    private func copyValues(of kind: HTTP1KnownField, _ w: inout HTTP1HeadWriter.RawWriter,
                            _ entries: [HTTP1FieldEntry], _ src: UnsafeRawPointer) {
        for e in entries where e.known == kind {
            copyValue(e, &w, src)
            w.copy(", ")
        }
    }

    @inline(__always)
    private func copyValue(_ e: HTTP1FieldEntry, _ w: inout HTTP1HeadWriter.RawWriter, _ src: UnsafeRawPointer) {
        w.copy(src + Int(e.valueStart), Int(e.valueLength))
    }
}

/// The proxy's own upstream lines but X-Request-Id, as written for an
/// earlier request on the same downstream connection, and the inputs they
/// were written from. They depend on the connection (client address,
/// scheme), the target (Host) and the client's Host, which the requests of
/// a keep-alive connection nearly always repeat: a request with the same
/// inputs copies these bytes (one copy) instead of writing five lines from
/// Strings (BENCHMARKS.md "core3", 2026-11-30). Only lines that carry no
/// value of the client's other lines are kept (no trusted peer's
/// X-Forwarded-*, no Via).
/// One per downstream connection (an HTTP/2 connection's streams share
/// theirs), used on its event loop only.
final class UpstreamOwnLinesMemo {
    fileprivate private(set) var bytes: [UInt8] = []
    private var kept = false
    private var host = "", clientIP = "", scheme = ""
    private var clientHost: String?
    private var chunked = false, upgrade = false
    /// The Via entry literal (`HeaderRewriting.viaEntryLiteral`), by address.
    private var viaEntry: UnsafeRawPointer?

    /// Whether `bytes` are the lines written from these inputs. The client
    /// address and the listener's scheme are the connection's: the same for
    /// every request of it, so not compared (`keptFor`, asserted by the caller).
    @inline(__always)
    func holdsLines(host: String, chunked: Bool, upgrade: Bool, clientHost: String?, viaEntry: StaticString) -> Bool {
        kept && self.chunked == chunked && self.upgrade == upgrade && self.viaEntry == UnsafeRawPointer(viaEntry.utf8Start)
            && self.host == host && self.clientHost == clientHost
    }

    /// For debug assertions: the kept lines were written for this client
    /// address and scheme.
    func keptFor(clientIP: String, scheme: String) -> Bool {
        self.clientIP == clientIP && self.scheme == scheme
    }

    /// Keeps `lines`, just written for `own`, for the next request.
    fileprivate func keep(_ lines: UnsafeRawBufferPointer, of own: UpstreamOwnFields.Inputs) {
        bytes.removeAll(keepingCapacity: true)
        bytes.append(contentsOf: lines)
        host = own.host
        clientIP = own.clientIP
        scheme = own.scheme
        clientHost = own.clientHost
        chunked = own.chunked
        upgrade = own.upgrade
        viaEntry = UnsafeRawPointer(own.viaEntry.utf8Start)
        kept = true
    }
}

extension RequestHead {
    /// The upstream head with the proxy's own lines as bytes (no plugin
    /// edits). A method on the head, as `writeUpstream(edits:)`: its
    /// `wire` is borrowed, not copied.
    func writeUpstream(own: UpstreamOwnFields, target: String?, into out: inout ByteBuffer) {
        let entries = wire.fields.entries
        let edits = HTTP1HeadEdits(removed: own.removed, target: target)
        HTTP1HeadWriter.writeRequest(wire, edits: edits, method: nil, tailBytes: own.byteCount(entries), into: &out) { w, src in
            own.write(&w, entries, src)
        }
    }
}

/// A client line that the proxy's own upstream lines replace: never
/// forwarded as it is; some are carried on into the proxy's line (a
/// trusted peer's X-Forwarded-*, every Via). The one list of them, read by
/// both upstream head writers (`UpstreamOwnFields` until a plugin touches
/// the upstream request, `ExchangeDownstream.upstreamEdits` after).
enum ReplacedClientLine {
    case dropped           // Host, X-Request-ID: the proxy writes its own
    case forwardedFor, forwardedProto, forwardedHost, via

    init?(_ field: HTTP1KnownField) {
        switch field {
        case .host, .xRequestID: self = .dropped
        case .xForwardedFor: self = .forwardedFor
        case .xForwardedProto: self = .forwardedProto
        case .xForwardedHost: self = .forwardedHost
        case .via: self = .via
        default: return nil
        }
    }
}
