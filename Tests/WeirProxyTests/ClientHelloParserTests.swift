// The TLS passthrough's ClientHello reader on hand-built hellos: SNI and
// ALPN, split across records and across reads at every byte, missing SNI,
// and malformed input of each kind.

import NIOCore
import WeirCore
@testable import WeirProxy
import XCTest

/// Builds ClientHello handshake messages and their TLS records.
enum ClientHelloBuilder {
    static func u16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
    static func u24(_ v: Int) -> [UInt8] { [UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    static func sniExtension(_ name: String) -> [UInt8] {
        let entry = [0] + u16(name.utf8.count) + Array(name.utf8)
        let data = u16(entry.count) + entry
        return u16(0) + u16(data.count) + data
    }

    static func alpnExtension(_ protocols: [String]) -> [UInt8] {
        var list: [UInt8] = []
        for p in protocols { list += [UInt8(p.utf8.count)] + Array(p.utf8) }
        let data = u16(list.count) + list
        return u16(16) + u16(data.count) + data
    }

    /// The handshake message (type 1). `extensions` nil leaves the block out.
    static func handshake(extensions: [[UInt8]]? = [], sessionID: Int = 32, padding: Int = 0) -> [UInt8] {
        var body: [UInt8] = [3, 3] + [UInt8](repeating: 7, count: 32)
        body += [UInt8(sessionID)] + [UInt8](repeating: 9, count: sessionID)
        body += u16(4) + [0x13, 0x01, 0x13, 0x02]          // two cipher suites
        body += [1, 0]                                      // null compression
        if var extensions {
            if padding > 0 { extensions.append(u16(21) + u16(padding) + [UInt8](repeating: 0, count: padding)) }
            let all = extensions.flatMap { $0 }
            body += u16(all.count) + all
        }
        return [1] + u24(body.count) + body
    }

    /// Handshake bytes as TLS records of at most `fragment` bytes each.
    static func records(_ handshake: [UInt8], fragment: Int = 16384) -> [UInt8] {
        var out: [UInt8] = []
        var offset = 0
        while offset < handshake.count {
            let n = min(fragment, handshake.count - offset)
            out += [22, 3, 1] + u16(n) + handshake[offset..<(offset + n)]
            offset += n
        }
        return out
    }

    static func hello(sni: String? = "api.example.com", alpn: [String] = ["h2", "http/1.1"], padding: Int = 0,
                      fragment: Int = 16384) -> [UInt8] {
        var extensions: [[UInt8]] = []
        if let sni { extensions.append(sniExtension(sni)) }
        if !alpn.isEmpty { extensions.append(alpnExtension(alpn)) }
        return records(handshake(extensions: extensions, padding: padding), fragment: fragment)
    }
}

final class ClientHelloParserTests: XCTestCase {
    private func parse(_ bytes: [UInt8], max: Int = 16384) -> ClientHelloParser.Outcome {
        ClientHelloParser.parse(ByteBuffer(bytes: bytes), maxBytes: max)
    }

    func testSNIAndALPN() {
        XCTAssertEqual(parse(ClientHelloBuilder.hello()),
                       .complete(ClientHelloInfo(serverName: "api.example.com", alpn: ["h2", "http/1.1"])))
    }

    func testServerNameIsLowerCasedAndTrailingDotDropped() {
        XCTAssertEqual(parse(ClientHelloBuilder.hello(sni: "API.Example.COM.", alpn: [])),
                       .complete(ClientHelloInfo(serverName: "api.example.com", alpn: [])))
    }

    func testMissingSNIAndNoExtensionsAtAll() {
        XCTAssertEqual(parse(ClientHelloBuilder.hello(sni: nil, alpn: ["h2"])),
                       .complete(ClientHelloInfo(serverName: nil, alpn: ["h2"])))
        let bare = ClientHelloBuilder.records(ClientHelloBuilder.handshake(extensions: nil))
        XCTAssertEqual(parse(bare), .complete(ClientHelloInfo(serverName: nil, alpn: [])))
    }

    func testEveryPrefixNeedsMoreAndEverySplitIntoRecordsParses() {
        let expected = ClientHelloParser.Outcome.complete(ClientHelloInfo(serverName: "api.example.com", alpn: ["h2", "http/1.1"]))
        let whole = ClientHelloBuilder.hello()
        for cut in 0..<whole.count {
            XCTAssertEqual(parse(Array(whole[0..<cut])), .needMore, "prefix of \(cut) bytes")
        }
        // The handshake spread over records of 1, 2, 3, 7, 50 bytes: each a
        // fragment, each split across reads at every byte.
        for fragment in [1, 2, 3, 7, 50] {
            let bytes = ClientHelloBuilder.hello(fragment: fragment)
            XCTAssertEqual(parse(bytes), expected, "fragment \(fragment)")
            for cut in stride(from: 0, to: bytes.count, by: max(1, bytes.count / 97)) {
                XCTAssertEqual(parse(Array(bytes[0..<cut])), .needMore, "fragment \(fragment), prefix \(cut)")
            }
        }
    }

    func testBytesAfterTheHelloAreIgnored() {
        let bytes = ClientHelloBuilder.hello() + [23, 3, 3, 0, 1, 0xAA]
        XCTAssertEqual(parse(bytes), .complete(ClientHelloInfo(serverName: "api.example.com", alpn: ["h2", "http/1.1"])))
    }

    func testNotTLS() {
        guard case .invalid(let reason) = parse(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)) else { return XCTFail() }
        XCTAssertTrue(reason.contains("not a TLS handshake"), reason)
        // SSLv2-style hello (first byte 0x80) is not supported.
        guard case .invalid = parse([0x80, 0x2e, 0x01, 0x03, 0x01]) else { return XCTFail() }
    }

    func testMalformedInputs() {
        var notClientHello = ClientHelloBuilder.hello()
        notClientHello[5] = 2                                       // ServerHello
        var zeroRecord = ClientHelloBuilder.hello()
        zeroRecord[3] = 0; zeroRecord[4] = 0                         // empty record
        var hugeRecord = ClientHelloBuilder.hello()
        hugeRecord[3] = 0x48                                         // 18 KiB record
        var badVersion = ClientHelloBuilder.hello()
        badVersion[1] = 2
        let badSessionID = ClientHelloBuilder.records(ClientHelloBuilder.handshake(sessionID: 33))
        // Extension lengths that overrun their block.
        let sni = ClientHelloBuilder.sniExtension("a.example.com")
        var overrun = sni
        overrun[3] = 0xFF
        let overrunHello = ClientHelloBuilder.records(ClientHelloBuilder.handshake(extensions: [overrun]))
        let duplicate = ClientHelloBuilder.records(ClientHelloBuilder.handshake(extensions: [sni, sni]))
        let badName = ClientHelloBuilder.hello(sni: "bad name!.com")
        let emptyALPN = ClientHelloBuilder.records(ClientHelloBuilder.handshake(extensions: [ClientHelloBuilder.u16(16) + ClientHelloBuilder.u16(2) + [0, 0]]))
        // An alert record where the rest of a fragmented hello should be.
        let split = ClientHelloBuilder.hello(fragment: 20)
        let interrupted = Array(split[0..<25]) + [21, 3, 3, 0, 2, 2, 40]
        for (name, bytes) in [("not ClientHello", notClientHello), ("empty record", zeroRecord), ("huge record", hugeRecord),
                              ("bad version", badVersion), ("session id > 32", badSessionID), ("overrun", overrunHello),
                              ("duplicate extension", duplicate), ("bad server name", badName), ("empty ALPN", emptyALPN),
                              ("interrupted", interrupted)] {
            guard case .invalid = parse(bytes) else { XCTFail("\(name): \(parse(bytes))"); continue }
        }
    }

    func testSizeCapIsCheckedFromTheDeclaredLength() {
        // A 20 KB hello (big padding extension) against a 16 KiB cap: refused
        // from its header, before the rest arrives.
        let big = ClientHelloBuilder.hello(padding: 20_000)
        guard case .invalid(let reason) = parse(Array(big[0..<64])) else { return XCTFail() }
        XCTAssertTrue(reason.contains("exceeds"), reason)
        // The same hello fits a 32 KiB cap.
        guard case .complete = parse(big, max: 32 * 1024) else { return XCTFail() }
    }
}

/// SNI routing precedence on the compiled table (no sockets).
final class StreamRoutingTests: XCTestCase {
    func testExactThenLongestWildcardThenDefault() throws {
        var listener = ListenerConfig()
        listener.name = "edge"
        listener.protocol = .tls
        listener.upstream = "fallback"
        listener.sniRoutes = [SNIRoute(serverNames: ["*.example.com"], upstream: "wide"),
                              SNIRoute(serverNames: ["*.apps.example.com", "exact.apps.example.com"], upstream: "narrow"),
                              SNIRoute(serverNames: ["api.example.com"], upstream: "api")]
        var byName: [String: UpstreamRuntime] = [:]
        for (i, name) in ["fallback", "wide", "narrow", "api"].enumerated() {
            var config = UpstreamConfig()
            config.name = name
            config.targets = [TargetConfig(address: HostPort(host: "127.0.0.1", port: 1000 + i))]
            byName[name] = UpstreamRuntime(index: i, config: config)
        }
        let routing = try StreamListenerRouting(listener: listener, upstreamsByName: byName)
        func route(_ sni: String?) -> String? { routing.upstream(serverName: sni)?.name }
        XCTAssertEqual(route("api.example.com"), "api")
        XCTAssertEqual(route("exact.apps.example.com"), "narrow")
        XCTAssertEqual(route("x.apps.example.com"), "narrow", "the longer wildcard suffix wins")
        XCTAssertEqual(route("a.b.apps.example.com"), "narrow")
        XCTAssertEqual(route("www.example.com"), "wide")
        XCTAssertEqual(route("example.com"), "fallback", "a wildcard needs a label before the suffix")
        XCTAssertEqual(route("example.org"), "fallback")
        XCTAssertEqual(route(nil), "fallback")
    }
}
