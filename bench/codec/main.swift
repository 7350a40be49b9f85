// weir-codec-bench: parse + forward-serialise one request head, Weir's
// HTTP1 codec against NIOHTTP1 (decoder and encoder on EmbeddedChannels,
// the way the proxy's pipelines use them). Run in release:
//
//   swift build -c release --product weir-codec-bench
//   .build/release/weir-codec-bench [ours|nio|both] [iterations] [small|browser|all]
//
// bench/codec/callgrind.sh gives instructions per request (stable on a busy
// machine); wall-clock ns here are only indicative.
import NIOCore
import NIOEmbedded
import NIOHTTP1
import WeirProxy
#if canImport(Glibc)
import Glibc
#endif

let smallGET = """
GET /api/v1/items/42?expand=owner HTTP/1.1\r
Host: api.example.com\r
User-Agent: curl/8.5.0\r
Accept: application/json\r
Accept-Encoding: gzip, deflate\r
Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.x\r
X-Request-ID: 6f1c2a9e-0d2b-4f51-9d1e-3b6c7a8e9f00\r
Connection: keep-alive\r
Cookie: session=abc123\r
\r

"""

let browserGET = """
GET /static/app.3f9a1c.js HTTP/1.1\r
Host: www.example.com\r
Connection: keep-alive\r
sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r
sec-ch-ua-mobile: ?0\r
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36\r
sec-ch-ua-platform: "Linux"\r
Accept: */*\r
Sec-Fetch-Site: same-origin\r
Sec-Fetch-Mode: no-cors\r
Sec-Fetch-Dest: script\r
Referer: https://www.example.com/products/widgets?page=2&sort=price\r
Accept-Encoding: gzip, deflate, br, zstd\r
Accept-Language: en-GB,en-US;q=0.9,en;q=0.8,fr;q=0.7\r
Cookie: _ga=GA1.2.1234567890.1700000000; _gid=GA1.2.987654321.1700000000; session=9f8e7d6c5b4a; prefs=dark\r
If-None-Match: W/"5e1-18f2a3b4c5d"\r
If-Modified-Since: Tue, 14 May 2024 10:00:00 GMT\r
Cache-Control: max-age=0\r
Pragma: no-cache\r
DNT: 1\r
Upgrade-Insecure-Requests: 1\r
\r

"""

let clientAddress = "192.0.2.10"

/// Weir's codec: parse, drop hop-by-hop and client X-Forwarded-For, add ours, copy the rest.
struct OursForwarder {
    var parser = HTTP1RequestParser()
    var out = ByteBuffer()

    mutating func forward(_ input: ByteBuffer) -> Int {
        var input = input
        guard let head = try! parser.parse(&input) else { fatalError("incomplete head") }
        var edits = HTTP1HeadEdits(removed: head.fields.hopByHopFields(),
                                   added: [HTTP1AddedField(name: "X-Forwarded-For", value: clientAddress)])
        edits.removed.formUnion(head.fields.indices(of: .xForwardedFor))
        out.clear()
        HTTP1HeadWriter.writeRequest(head, edits: edits, into: &out)
        return out.readableBytes
    }
}

/// NIOHTTP1: decode on one channel, rebuild the headers without hop-by-hop
/// fields (as the proxy does), encode on another.
final class NIOForwarder {
    let decoderChannel = EmbeddedChannel()
    let encoderChannel = EmbeddedChannel()

    init() {
        try! decoderChannel.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPRequestDecoder()))
        try! encoderChannel.pipeline.syncOperations.addHandler(HTTPRequestEncoder())
    }

    static let hopByHop: [String] = ["connection", "keep-alive", "proxy-connection", "te", "trailer",
                                     "transfer-encoding", "upgrade", "x-forwarded-for"]

    @inline(__always)
    static func isHopByHop(_ name: String) -> Bool {
        for h in hopByHop where h.utf8.count == name.utf8.count {
            if zip(h.utf8, name.utf8).allSatisfy({ $0 == ($1 >= 0x41 && $1 <= 0x5A ? $1 | 0x20 : $1) }) { return true }
        }
        return false
    }

    /// Decode only (no header rebuild, no encode): splits NIO's cost.
    func decode(_ input: ByteBuffer) -> Int {
        try! decoderChannel.writeInbound(input)
        guard case .head(let head) = try! decoderChannel.readInbound(as: HTTPServerRequestPart.self)! else { fatalError() }
        _ = try! decoderChannel.readInbound(as: HTTPServerRequestPart.self) // .end
        return head.headers.count
    }

    func forward(_ input: ByteBuffer) -> Int {
        try! decoderChannel.writeInbound(input)
        guard case .head(let head) = try! decoderChannel.readInbound(as: HTTPServerRequestPart.self)! else { fatalError() }
        _ = try! decoderChannel.readInbound(as: HTTPServerRequestPart.self) // .end
        var headers = HTTPHeaders()
        for (name, value) in head.headers where !NIOForwarder.isHopByHop(name) { headers.add(name: name, value: value) }
        headers.add(name: "X-Forwarded-For", value: clientAddress)
        let outHead = HTTPRequestHead(version: .http1_1, method: head.method, uri: head.uri, headers: headers)
        try! encoderChannel.writeOutbound(HTTPClientRequestPart.head(outHead))
        var written = 0
        while let b = try! encoderChannel.readOutbound(as: ByteBuffer.self) { written += b.readableBytes }
        return written
    }
}

func now() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

let args = CommandLine.arguments
let mode = args.count > 1 ? args[1] : "both"
let iterations = args.count > 2 ? Int(args[2])! : 200_000
let which = args.count > 3 ? args[3] : "all"
guard ["ours", "nio", "both", "nio-decode"].contains(mode), ["small", "browser", "all"].contains(which) else {
    print("usage: weir-codec-bench [ours|nio|both|nio-decode] [iterations] [small|browser|all]")
    exit(2)
}

var cases: [(String, ByteBuffer)] = []
if which != "browser" { cases.append(("8-header GET", ByteBuffer(string: smallGET))) }
if which != "small" { cases.append(("20-header browser GET", ByteBuffer(string: browserGET))) }

func measureOurs(_ input: ByteBuffer, _ iterations: Int) -> (ns: Double, bytes: Int) {
    var ours = OursForwarder()
    var sink = 0
    let start = now()
    for _ in 0..<iterations { sink &+= ours.forward(input) }
    let ns = Double(now() - start) / Double(iterations)
    return (ns, sink / max(iterations, 1))
}

func measureNIO(_ input: ByteBuffer, _ iterations: Int, decodeOnly: Bool = false) -> (ns: Double, bytes: Int) {
    let nio = NIOForwarder()
    var sink = 0
    let start = now()
    if decodeOnly {
        for _ in 0..<iterations { sink &+= nio.decode(input) }
    } else {
        for _ in 0..<iterations { sink &+= nio.forward(input) }
    }
    let ns = Double(now() - start) / Double(iterations)
    return (ns, sink / max(iterations, 1))
}

for (label, input) in cases {
    if mode != "nio" {
        let r = measureOurs(input, iterations)
        print("\(label): ours \(Int(r.ns.rounded())) ns/request, forwarded head \(r.bytes) bytes")
    }
    if mode == "nio-decode" {
        let r = measureNIO(input, iterations, decodeOnly: true)
        print("\(label): NIOHTTP1 decode only \(Int(r.ns.rounded())) ns/request, \(r.bytes) headers")
        continue
    }
    if mode != "ours" {
        let r = measureNIO(input, iterations)
        print("\(label): NIOHTTP1 \(Int(r.ns.rounded())) ns/request, forwarded head \(r.bytes) bytes")
    }
}
