// gRPC end to end over HTTP/2 on both sides: a python3-h2 client speaks
// h2c (prior knowledge) to the proxy, the proxy forwards each stream to the
// swift-nio-http2 gRPC echo origin (HTTP2TestUpstream) over a
// `protocol: http2` upstream. Checks what a gRPC client depends on: the
// response head, messages in DATA, trailers as trailing HEADERS with
// END_STREAM, trailers-only errors (one HEADERS frame with END_STREAM),
// streaming both ways, deadlines and upstream failure in gRPC form.

import Foundation
import NIOPosix
import WeirCore
@testable import WeirProxy
import WeirTestSupport
import XCTest

final class GRPCEndToEndTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var origin: HTTP2TestUpstream?
    var proxy: ProxyHarness?

    override func setUpWithError() throws {
        try XCTSkipUnless(H2Script.available, "python3-h2 is not installed")
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        proxy?.stop()
        origin?.stop()
        try? group?.syncShutdownGracefully()
    }

    /// A proxy whose one route goes to the gRPC origin (or to `target`) over HTTP/2.
    private func startProxy(target: HostPort? = nil) throws -> ProxyHarness {
        let address: HostPort
        if let target {
            address = target
        } else {
            let origin = try HTTP2TestUpstream(name: "grpc", group: group)
            self.origin = origin
            address = HostPort(host: "127.0.0.1", port: origin.port)
        }
        let config = ProxyHarness.config(targets: [address]) {
            $0.upstreams[0].upstreamProtocol = .http2
            $0.upstreams[0].retries = 0
        }
        let proxy = try ProxyHarness(config: config, loops: 1)
        self.proxy = proxy
        return proxy
    }

    /// What the HTTP/2 client saw of one call.
    struct Call {
        let json: [String: Any]
        var status: Int? { json["status"] as? Int }
        var headers: [String: String] { json["headers"] as? [String: String] ?? [:] }
        var trailers: [String: String] { json["trailers"] as? [String: String] ?? [:] }
        var messages: [String] { json["messages"] as? [String] ?? [] }
        /// END_STREAM on the response HEADERS: a trailers-only response.
        var headEndsStream: Bool { json["head_end_stream"] as? Bool ?? false }
        /// END_STREAM on the trailing HEADERS.
        var trailersEndStream: Bool { json["trailers_end_stream"] as? Bool ?? false }
        var ended: Bool { json["ended"] as? Bool ?? false }
        var reset: Int? { json["reset"] as? Int }
        var log: [String] { json["log"] as? [String] ?? [] }
    }

    /// `call`: sends `messages` (the last with END_STREAM) and reads the
    /// answer; `bidi N`: sends "turn i" and waits for its echo before the next.
    private func run(_ proxy: ProxyHarness, _ mode: String, _ path: String, _ args: [String]) throws -> Call {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("weir-grpc-e2e-\(getpid()).py")
        if !FileManager.default.fileExists(atPath: url.path) {
            try Self.clientSource.write(to: url, atomically: true, encoding: .utf8)
        }
        let result = try runProgram(H2Script.python, [url.path, String(proxy.port), mode, path] + args)
        guard let line = result.out.split(separator: "\n").last,
              let json = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
            XCTFail("gRPC client printed no JSON; exit \(result.status); stderr: \(result.err)")
            return Call(json: [:])
        }
        return Call(json: json)
    }

    private func call(_ proxy: ProxyHarness, _ path: String, headers: [(String, String)] = [], messages: [String]) throws -> Call {
        try run(proxy, "call", path, headers.map { "\($0.0)=\($0.1)" } + ["--"] + messages)
    }

    func testUnaryCallTrailersArriveAsTrailingHeadersWithEndStream() throws {
        let proxy = try startProxy()
        let call = try call(proxy, "/grpc.Echo/Unary", messages: ["ping"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertEqual(call.headers["content-type"], "application/grpc")
        XCTAssertFalse(call.headEndsStream)
        XCTAssertEqual(call.messages, ["ping"])
        XCTAssertEqual(call.trailers["grpc-status"], "0")
        XCTAssertTrue(call.trailersEndStream, "\(call.json)")
        XCTAssertNil(call.reset)
        XCTAssertEqual(call.log.last, "trailers")
        // Connection-specific fields never reach the HTTP/2 client.
        for name in ["transfer-encoding", "connection", "keep-alive"] { XCTAssertNil(call.headers[name], name) }
        let seen = try XCTUnwrap(origin?.requestHeaders.last)
        XCTAssertEqual(seen.first { $0.0 == "te" }?.1, "trailers")
        XCTAssertEqual(seen.first { $0.0 == "content-type" }?.1, "application/grpc")
    }

    func testNonZeroStatusTrailersOnlyPassesThrough() throws {
        let proxy = try startProxy()
        let call = try call(proxy, "/grpc.Echo/Fail", messages: ["x"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        // Trailers-only: grpc-status in the one HEADERS frame, which ends the stream.
        XCTAssertTrue(call.headEndsStream, "\(call.json)")
        XCTAssertEqual(call.headers["grpc-status"], "7")
        XCTAssertEqual(call.headers["grpc-message"], "denied")
        XCTAssertTrue(call.messages.isEmpty)
        XCTAssertTrue(call.trailers.isEmpty)
        XCTAssertNil(call.reset)
    }

    /// A failure after messages: status and message in the trailing HEADERS.
    func testNonZeroStatusInTrailersPassesThrough() throws {
        let proxy = try startProxy()
        let call = try call(proxy, "/grpc.Echo/FailAfterReply", messages: ["x"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertFalse(call.headEndsStream)
        XCTAssertNil(call.headers["grpc-status"])
        XCTAssertEqual(call.messages, ["partial"])
        XCTAssertEqual(call.trailers["grpc-status"], "13")
        XCTAssertEqual(call.trailers["grpc-message"], "boom")
        XCTAssertTrue(call.trailersEndStream, "\(call.json)")
        XCTAssertNil(call.reset)
    }

    func testServerStreaming() throws {
        let proxy = try startProxy()
        let call = try call(proxy, "/grpc.Echo/ServerStream", messages: ["4"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertEqual(call.messages, (0..<4).map { "reply \($0)" })
        XCTAssertEqual(call.trailers["grpc-status"], "0")
        XCTAssertTrue(call.trailersEndStream)
    }

    /// Each message goes up and its echo comes back before the next is sent:
    /// neither direction waits for the other's end.
    func testBidiStreamingInterleaves() throws {
        let proxy = try startProxy()
        let call = try run(proxy, "bidi", "/grpc.Echo/Bidi", ["3"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertEqual(call.messages, ["turn 0", "turn 1", "turn 2"])
        let exchange = call.log.filter { $0.hasPrefix("sent:") || $0.hasPrefix("data:") }
        XCTAssertEqual(exchange, ["sent:turn 0", "data:turn 0", "sent:turn 1", "data:turn 1", "sent:turn 2", "data:turn 2"])
        XCTAssertEqual(call.trailers["grpc-status"], "0")
        XCTAssertTrue(call.trailersEndStream)
    }

    func testDeadlineExceededReachesTheHTTP2ClientAsStatus4() throws {
        let proxy = try startProxy()
        let call = try call(proxy, "/grpc.Echo/Sleep", headers: [("grpc-timeout", "200m"), ("x-delay-ms", "3000")], messages: ["x"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertEqual(call.headers["content-type"], "application/grpc")
        XCTAssertEqual(call.headers["grpc-status"] ?? call.trailers["grpc-status"], "4", "\(call.json)")
        XCTAssertTrue(call.headEndsStream, "a gRPC error answer is trailers-only: \(call.json)")
        XCTAssertNil(call.reset)
        XCTAssertTrue(call.messages.isEmpty)
    }

    /// The deadline fires after the origin's response head and a message went
    /// out (a bidi call the client leaves open): the status comes as
    /// trailers, not as a bare RST_STREAM the client would read as CANCELLED.
    func testDeadlineAfterResponseStartedEndsWithStatus4Trailers() throws {
        let proxy = try startProxy()
        let call = try run(proxy, "bidi-open", "/grpc.Echo/Bidi", ["grpc-timeout=300m"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertEqual(call.messages, ["turn 0"])
        XCTAssertEqual(call.trailers["grpc-status"], "4", "\(call.json)")
        XCTAssertNotNil(call.trailers["grpc-message"])
        XCTAssertTrue(call.trailersEndStream, "\(call.json)")
    }

    func testUpstreamDownIsUnavailableInGRPCForm() throws {
        let proxy = try startProxy(target: HostPort(host: "127.0.0.1", port: try refusingPort()))
        let call = try call(proxy, "/grpc.Echo/Unary", messages: ["x"])
        XCTAssertEqual(call.status, 200, "\(call.json)")
        XCTAssertTrue(call.headEndsStream, "trailers-only: \(call.json)")
        XCTAssertEqual(call.headers["grpc-status"], "14")
        XCTAssertEqual(call.headers["content-type"], "application/grpc")
        XCTAssertNotNil(call.headers["grpc-message"])
        XCTAssertNil(call.headers["content-length"].flatMap { $0 == "0" ? nil : $0 }, "no body announced")
        XCTAssertNil(call.reset)
        XCTAssertTrue(call.messages.isEmpty)
    }

    static let clientSource = #"""
import json, socket, sys, time, struct
import h2.config, h2.connection, h2.events

PORT = int(sys.argv[1]); MODE = sys.argv[2]; PATH = sys.argv[3]; ARGS = sys.argv[4:]

def frame(text):
    b = text.encode()
    return b"\x00" + struct.pack(">I", len(b)) + b

def messages(data):
    out = []; i = 0
    while i + 5 <= len(data):
        n = struct.unpack(">I", data[i+1:i+5])[0]
        if i + 5 + n > len(data): break
        out.append(data[i+5:i+5+n].decode(errors="replace")); i += 5 + n
    return out

s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
c.initiate_connection(); s.sendall(c.data_to_send())
log = []
st = {"status": None, "headers": {}, "data": b"", "trailers": {}, "head_end_stream": False,
      "trailers_end_stream": False, "ended": False, "reset": None, "goaway": None, "closed": False}

def pump(sid, until, seconds=8):
    deadline = time.time() + seconds
    while time.time() < deadline and not until():
        s.settimeout(max(0.05, deadline - time.time()))
        try: data = s.recv(65536)
        except socket.timeout: break
        except OSError: st["closed"] = True; return
        if not data: st["closed"] = True; return
        for e in c.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                for k, v in e.headers:
                    if k == ":status": st["status"] = int(v)
                    else: st["headers"][k] = v
                st["head_end_stream"] = e.stream_ended is not None
                log.append("headers")
            elif isinstance(e, h2.events.DataReceived) and e.stream_id == sid:
                st["data"] += e.data
                c.acknowledge_received_data(e.flow_controlled_length, sid)
                log.append("data:" + ",".join(messages(e.data)))
            elif isinstance(e, h2.events.TrailersReceived) and e.stream_id == sid:
                st["trailers"].update(dict(e.headers))
                st["trailers_end_stream"] = e.stream_ended is not None
                log.append("trailers")
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id == sid:
                st["ended"] = True
            elif isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                st["reset"] = int(e.error_code)
            elif isinstance(e, h2.events.ConnectionTerminated):
                st["goaway"] = int(e.error_code)
        out = c.data_to_send()
        if out: s.sendall(out)

def finished(): return st["ended"] or st["reset"] is not None or st["closed"]

def start(extra):
    sid = c.get_next_available_stream_id()
    h = [(":method", "POST"), (":scheme", "http"), (":path", PATH), (":authority", "grpc.local"),
         ("content-type", "application/grpc"), ("te", "trailers")] + extra
    c.send_headers(sid, h); s.sendall(c.data_to_send())
    return sid

def send(sid, text, end=False):
    c.send_data(sid, frame(text), end_stream=end); s.sendall(c.data_to_send())
    log.append("sent:" + text)

if MODE == "call":
    # ARGS: header k=v pairs, then "--", then messages
    split = ARGS.index("--") if "--" in ARGS else len(ARGS)
    extra = [tuple(a.split("=", 1)) for a in ARGS[:split]]
    msgs = ARGS[split + 1:]
    sid = start(extra)
    for i, m in enumerate(msgs): send(sid, m, end=(i == len(msgs) - 1))
    if not msgs: c.end_stream(sid); s.sendall(c.data_to_send())
    pump(sid, finished)
    # The connection stays usable for another call afterwards.
elif MODE == "bidi":
    sid = start([])
    for i in range(int(ARGS[0])):
        want = "turn %d" % i
        send(sid, want)
        pump(sid, lambda: want in messages(st["data"]) or finished())
    c.end_stream(sid); s.sendall(c.data_to_send())
    pump(sid, finished)

elif MODE == "bidi-open":
    # One turn, then the client neither sends nor ends: only the deadline ends the call.
    extra = [tuple(a.split("=", 1)) for a in ARGS]
    sid = start(extra)
    send(sid, "turn 0")
    pump(sid, finished)

st["messages"] = messages(st["data"]); del st["data"]
st["log"] = log
print(json.dumps(st))
"""#
}
