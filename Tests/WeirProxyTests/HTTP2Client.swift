// HTTP/2 clients for the downstream HTTP/2 tests: curl (--http2-prior-knowledge)
// and a python3-h2 script (Debian's python3-h2) that misbehaves on purpose.

import Foundation
import WeirCore
import XCTest

extension UpstreamTestCase {
    /// A proxy on one event loop in front of `upstream`, its listener's
    /// `http2:` settings adjusted by `configure`.
    func http2Proxy(_ configure: (inout HTTP2ListenerSettings) -> Void = { _ in }) throws -> ProxyHarness {
        let config = ProxyHarness.config(targets: [upstream.address]) { config in
            configure(&config.listeners[0].http2)
        }
        return try ProxyHarness(config: config, loops: 1)
    }
}

/// Runs a program to its end (bounded) and returns its exit status and output.
func runProgram(_ path: String, _ arguments: [String], timeoutSeconds: Double = 20) throws -> (status: Int32, out: String, err: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    // Read while it runs so a full pipe never blocks it (each box is
    // written by its reader before `group` is left, read after the wait).
    final class Box: @unchecked Sendable { var data = Data() }
    let outBox = Box(), errBox = Box()
    let group = DispatchGroup()
    group.enter()
    DispatchQueue.global().async { outBox.data = out.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    group.enter()
    DispatchQueue.global().async { errBox.data = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
    let deadline = Date().addingTimeInterval(timeoutSeconds)
    while process.isRunning && Date() < deadline { usleep(10_000) }
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
    _ = group.wait(timeout: .now() + 5)
    return (process.terminationStatus, String(decoding: outBox.data, as: UTF8.self), String(decoding: errBox.data, as: UTF8.self))
}

/// The python3-h2 client (`/usr/bin/python3`, Debian's python3-h2).
/// Every mode prints one JSON object on stdout.
enum H2Script {
    static let python = "/usr/bin/python3"
    /// The script is written once per test process (a file left by an
    /// earlier process with the same pid may be an older version).
    nonisolated(unsafe) private static var written = false

    static var available: Bool {
        (try? runProgram(python, ["-c", "import h2, hyperframe, hpack"]).status) == 0
    }

    static func run(port: Int, _ mode: String, _ args: [String] = [], timeoutSeconds: Double = 20) throws -> [String: Any] {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("weir-h2client-\(getpid()).py")
        if !written {
            try source.write(to: url, atomically: true, encoding: .utf8)
            written = true
        }
        let result = try runProgram(python, [url.path, String(port), mode] + args, timeoutSeconds: timeoutSeconds)
        guard let data = result.out.split(separator: "\n").last.map({ Data($0.utf8) }),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            XCTFail("h2 client \(mode) printed no JSON; exit \(result.status); stderr: \(result.err)")
            return [:]
        }
        return object
    }

    static let source = #"""
import json, socket, sys, time
import h2.config, h2.connection, h2.events, h2.settings
from hyperframe.frame import HeadersFrame, ContinuationFrame, DataFrame, WindowUpdateFrame, SettingsFrame, PingFrame
import hpack

PORT = int(sys.argv[1]); MODE = sys.argv[2]; ARGS = sys.argv[3:]
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

def connect():
    s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    cfg = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                    normalize_outbound_headers=False, validate_inbound_headers=False)
    c = h2.connection.H2Connection(config=cfg)
    c.initiate_connection()
    s.sendall(c.data_to_send())
    return s, c

def pump(s, c, until, seconds=5):
    """Reads events until until(events_so_far) is true; returns (events, closed)."""
    events = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        if until(events): return events, False
        s.settimeout(max(0.05, deadline - time.time()))
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        except (ConnectionResetError, BrokenPipeError):
            return events, True
        if not data: return events, True
        try:
            events += c.receive_data(data)
        except Exception as e:
            events.append(("client-error", str(e)))
        out = c.data_to_send()
        if out:
            try: s.sendall(out)
            except OSError: return events, True
    return events, False

def request(s, c, path, headers=None, body=None, trailers=None):
    sid = c.get_next_available_stream_id()
    h = [(":method", "POST" if body is not None else "GET"), (":path", path), (":scheme", "http"), (":authority", "test.local")]
    h += headers or []
    c.send_headers(sid, h, end_stream=body is None)
    s.sendall(c.data_to_send())
    if body is not None:
        send_body(s, c, sid, body)
        if trailers: c.send_headers(sid, trailers, end_stream=True)
        else: c.end_stream(sid)
        s.sendall(c.data_to_send())
    return sid

def send_body(s, c, sid, body):
    """Sends as the proxy's flow-control windows allow (they open as it forwards)."""
    while body:
        n = min(c.local_flow_control_window(sid), c.max_outbound_frame_size, len(body))
        if n <= 0:
            pump(s, c, lambda ev: any(isinstance(e, h2.events.WindowUpdated) for e in ev), 5)
            continue
        c.send_data(sid, body[:n]); body = body[n:]
        s.sendall(c.data_to_send())

def response(s, c, sid, seconds=5):
    done = lambda ev: any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid for e in ev)
    events, closed = pump(s, c, done, seconds)
    out = {"status": None, "headers": {}, "body": "", "trailers": {}, "reset": None, "closed": closed}
    for e in events:
        if getattr(e, "stream_id", None) != sid: continue
        if isinstance(e, h2.events.ResponseReceived):
            for k, v in e.headers:
                k = k.decode() if isinstance(k, bytes) else k; v = v.decode() if isinstance(v, bytes) else v
                if k == ":status": out["status"] = int(v)
                else: out["headers"][k] = v
        elif isinstance(e, h2.events.DataReceived):
            out["body"] += e.data.decode(errors="replace")
            c.acknowledge_received_data(e.flow_controlled_length, sid)
        elif isinstance(e, h2.events.TrailersReceived):
            for k, v in e.headers:
                out["trailers"][k.decode() if isinstance(k, bytes) else k] = v.decode() if isinstance(v, bytes) else v
        elif isinstance(e, h2.events.StreamReset):
            out["reset"] = int(e.error_code)
    try: s.sendall(c.data_to_send())
    except OSError: pass
    return out

def goaway_of(events):
    for e in events:
        if isinstance(e, h2.events.ConnectionTerminated): return int(e.error_code)
    return None

def raw_headers_block(headers):
    return hpack.Encoder().encode(headers)

def wait_end(s, c, seconds=5):
    events, closed = pump(s, c, lambda ev: goaway_of(ev) is not None, seconds)
    if goaway_of(events) is not None:
        # After GOAWAY the server closes: wait for it.
        more, closed = pump(s, c, lambda ev: False, 2)
    return goaway_of(events), closed

def with_bystander(abuse):
    """A well-behaved connection is served before and after the abuse on another one."""
    gs, gc = connect()
    before = response(gs, gc, request(gs, gc, "/before"))["status"]
    result = abuse()
    after = response(gs, gc, request(gs, gc, "/after"))["status"]
    result.update({"bystander_before": before, "bystander_after": after})
    return result

result = {}
if MODE == "get":
    s, c = connect()
    headers = [tuple(a.split(":", 1)) for a in ARGS[1:]]
    result = response(s, c, request(s, c, ARGS[0], headers=headers))
elif MODE == "request-json":
    # ARGS[0]: the whole header list (pseudo-headers too) as JSON [[name, value], ...], sent as is.
    s, c = connect()
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [tuple(f) for f in json.loads(ARGS[0])], end_stream=True)
    s.sendall(c.data_to_send())
    result = response(s, c, sid)
    result["next_status"] = response(s, c, request(s, c, "/again"))["status"]
elif MODE == "staggered":
    # ARGS: "path@delay_ms" ...: each request starts delay_ms after the
    # start, all on one connection; prints each stream's status (or reset).
    s, c = connect()
    start = time.time(); sids = []; events = []
    for spec in sorted(ARGS, key=lambda a: int(a.split("@")[1])):
        path, delay = spec.split("@")
        while time.time() < start + int(delay) / 1000.0:
            events += pump(s, c, lambda ev: False, max(0.01, start + int(delay) / 1000.0 - time.time()))[0]
        sids.append((path, request(s, c, path)))
    done = {}
    ended = lambda ev: len([e for e in ev if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))])
    more, closed = pump(s, c, lambda ev: ended(events) + ended(ev) >= len(sids), 8)
    events += more
    for path, sid in sids:
        status = None
        for e in events:
            if getattr(e, "stream_id", None) != sid: continue
            if isinstance(e, h2.events.ResponseReceived):
                for k, v in e.headers:
                    if (k.decode() if isinstance(k, bytes) else k) == ":status": status = int(v)
            elif isinstance(e, h2.events.StreamReset) and status is None: status = -int(e.error_code)
        done[path] = status
    result = {"statuses": done, "closed": closed, "seconds": round(time.time() - start, 2)}
elif MODE == "post-trailers":
    s, c = connect()
    body = b"x" * int(ARGS[1])
    result = response(s, c, request(s, c, ARGS[0], headers=[("te", "trailers")], body=body, trailers=[("x-client-trailer", "t1")]))
elif MODE == "rapid-reset":
    def abuse():
        s, c = connect()
        n = int(ARGS[0]); sent = 0
        try:
            for i in range(n):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, [(":method", "GET"), (":path", "/slow/2000"), (":scheme", "http"), (":authority", "t")])
                c.reset_stream(sid)
                s.sendall(c.data_to_send()); sent += 1
        except Exception:
            pass
        code, closed = wait_end(s, c)
        return {"sent": sent, "goaway": code, "closed": closed}
    result = with_bystander(abuse)
elif MODE == "continuation-flood":
    def abuse():
        s, c = connect()
        block = raw_headers_block([(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t")])
        f = HeadersFrame(1); f.data = block; f.flags.add("END_STREAM")
        frames = f.serialize()
        junk = raw_headers_block([("x-junk", "a" * 1000)])
        for i in range(int(ARGS[0])):
            cf = ContinuationFrame(1); cf.data = junk
            frames += cf.serialize()
        try: s.sendall(frames)
        except OSError: pass
        code, closed = wait_end(s, c)
        return {"goaway": code, "closed": closed}
    result = with_bystander(abuse)
elif MODE == "too-many-streams":
    def abuse():
        s, c = connect()
        ev, _ = pump(s, c, lambda ev: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in ev), 2)
        advertised = None
        for e in ev:
            if isinstance(e, h2.events.RemoteSettingsChanged):
                ch = e.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                if ch is not None: advertised = ch.new_value
        c.update_settings({})  # keep the state machine happy
        n = int(ARGS[0]); ids = []
        # Bypass the client's own limit: encode HEADERS by hand.
        enc = hpack.Encoder(); frames = b""
        for i in range(n):
            sid = 1 + 2 * i; ids.append(sid)
            f = HeadersFrame(sid); f.data = enc.encode([(":method", "GET"), (":path", "/slow/1500"), (":scheme", "http"), (":authority", "t")])
            f.flags.add("END_HEADERS"); f.flags.add("END_STREAM"); frames += f.serialize()
        s.sendall(frames)
        # Read raw frames: count RST_STREAM REFUSED_STREAM (7) and 200s.
        from hyperframe.frame import Frame, RstStreamFrame, GoAwayFrame
        buf = b""; refused = 0; goaway = None; deadline = time.time() + 5; ok_heads = 0
        dec = hpack.Decoder()
        while time.time() < deadline and refused + ok_heads < n:
            s.settimeout(0.5)
            try: data = s.recv(65536)
            except socket.timeout: continue
            if not data: break
            buf += data
            while len(buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(buf[:9]))
                if len(buf) < 9 + length: break
                f.parse_body(memoryview(buf[9:9 + length])); buf = buf[9 + length:]
                if isinstance(f, RstStreamFrame) and f.error_code == 7: refused += 1
                elif isinstance(f, GoAwayFrame): goaway = f.error_code
                elif isinstance(f, HeadersFrame):
                    hs = dec.decode(f.data)
                    if (":status", "200") in [(k if isinstance(k, str) else k.decode(), v if isinstance(v, str) else v.decode()) for k, v in hs]: ok_heads += 1
                elif isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                    s.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        return {"sent": n, "refused": refused, "ok": ok_heads, "goaway": goaway, "advertised": advertised}
    result = with_bystander(abuse)
elif MODE == "window-overflow":
    def abuse():
        s, c = connect()
        w = WindowUpdateFrame(0); w.window_increment = 2**31 - 1
        s.sendall(w.serialize() + w.serialize())
        code, closed = wait_end(s, c)
        return {"goaway": code, "closed": closed}
    result = with_bystander(abuse)
elif MODE == "big-headers":
    # ARGS: number of 1 KB fields, "end" (HEADERS with END_STREAM) or "body"
    # (a body would follow). The block ends with x-kept, which HPACK indexes:
    # the next request on the connection refers to it by index only.
    def abuse():
        s, c = connect()
        sid = c.get_next_available_stream_id()
        h = [(":method", "GET" if ARGS[1] == "end" else "POST"), (":path", "/"), (":scheme", "http"), (":authority", "test.local")]
        h += [("x-big-%d" % i, "v" * 1000) for i in range(int(ARGS[0]))] + [("x-kept", "yes")]
        c.send_headers(sid, h, end_stream=ARGS[1] == "end")
        s.sendall(c.data_to_send())
        r = response(s, c, sid)
        r["next_status"] = response(s, c, request(s, c, "/again", headers=[("x-kept", "yes")]))["status"]
        code, closed = wait_end(s, c, 0.5)
        r.update({"goaway": code, "closed": closed or r["closed"]})
        return r
    result = with_bystander(abuse)
elif MODE == "reset-threshold":
    # ARGS: N. N streams opened and reset at once, then a request on the same
    # connection, then one reset more: where does the connection end?
    def abuse():
        s, c = connect()
        n = int(ARGS[0]); frames = b""
        for i in range(n):
            sid = c.get_next_available_stream_id()
            c.send_headers(sid, [(":method", "GET"), (":path", "/reset"), (":scheme", "http"), (":authority", "t")], end_stream=True)
            c.reset_stream(sid)
            frames += c.data_to_send()
        try:
            s.sendall(frames)
            r = response(s, c, request(s, c, "/after-resets"))
        except OSError:
            # Cut before the N-th (a limit lower than the configured one).
            return {"status_after_n": None, "closed_after_n": True, "goaway": None, "closed": True}
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "GET"), (":path", "/reset"), (":scheme", "http"), (":authority", "t")], end_stream=True)
        c.reset_stream(sid)
        try: s.sendall(c.data_to_send())
        except OSError: pass
        code, closed = wait_end(s, c)
        return {"status_after_n": r["status"], "closed_after_n": r["closed"], "goaway": code, "closed": closed}
    result = with_bystander(abuse)
elif MODE == "glitch-threshold":
    # ARGS: N, kind. N glitches one at a time (each waits for its RST_STREAM),
    # a request on the same connection, then one glitch more.
    #   header: a malformed request (an upper-case field name): RST_STREAM
    #   refused: a request whose head Weir refuses (content-length: abc): 400
    #   frame: a WINDOW_UPDATE overflowing a stream's send window (nghttp2
    #          finds it invalid: RST_STREAM FLOW_CONTROL_ERROR)
    def abuse():
        s, c = connect()
        n = int(ARGS[0]); kind = ARGS[1]; resets = []; goaway = None; closed = False
        def glitch():
            sid = c.get_next_available_stream_id()
            if kind == "header":
                c.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t"), ("X-Upper", "1")], end_stream=True)
                s.sendall(c.data_to_send())
            elif kind == "refused":
                c.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t"), ("content-length", "abc")], end_stream=True)
                s.sendall(c.data_to_send())
            else:
                c.send_headers(sid, [(":method", "GET"), (":path", "/slow/1000"), (":scheme", "http"), (":authority", "t")], end_stream=True)
                w = WindowUpdateFrame(sid); w.window_increment = 2**31 - 1
                s.sendall(c.data_to_send() + w.serialize())
            ev, cl = pump(s, c, lambda ev: any(isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded, h2.events.ConnectionTerminated)) for e in ev), 5)
            # A reset (its error code), or a response (its status, negative).
            answers = [int(e.error_code) for e in ev if isinstance(e, h2.events.StreamReset)]
            answers += [-int(dict(e.headers)[b":status"]) for e in ev if isinstance(e, h2.events.ResponseReceived)]
            return answers, goaway_of(ev), cl
        for i in range(n):
            r, g, cl = glitch()
            resets += r
            if g is not None or cl: goaway = g; closed = cl; break
        status = None
        if goaway is None and not closed:
            status = response(s, c, request(s, c, "/after-glitches"))["status"]
            r, g, cl = glitch()
            code, cl2 = wait_end(s, c, 2) if g is None else (g, cl)
        else:
            code = None
        return {"answers": resets, "goaway_before": goaway, "status_after_n": status, "goaway": code}
    result = with_bystander(abuse)
elif MODE == "stream-error":
    # One malformed request: expect RST_STREAM (error code) and the connection still usable.
    s, c = connect()
    kind = ARGS[0]
    base = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t")]
    post = [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "t")]
    body = None; trailers = None
    if kind == "uppercase": h = base + [("X-Upper", "1")]
    elif kind == "connection-header": h = base + [("connection", "keep-alive")]
    elif kind == "transfer-encoding": h = base + [("transfer-encoding", "chunked")]
    elif kind == "te-gzip": h = base + [("te", "gzip")]
    elif kind == "unknown-pseudo": h = base + [(":foo", "bar")]
    elif kind == "protocol-pseudo": h = base + [(":protocol", "websocket")]
    elif kind == "duplicate-pseudo": h = base + [(":path", "/again")]
    elif kind == "missing-path": h = [(":method", "GET"), (":scheme", "http"), (":authority", "t")]
    elif kind == "empty-path": h = [(":method", "GET"), (":path", ""), (":scheme", "http"), (":authority", "t")]
    elif kind == "space-in-path": h = [(":method", "GET"), (":path", "/a b"), (":scheme", "http"), (":authority", "t")]
    elif kind == "connect-with-path": h = [(":method", "CONNECT"), (":path", "/"), (":authority", "t:443")]
    elif kind == "pseudo-after-regular": h = [(":method", "GET"), ("x-a", "1"), (":path", "/"), (":scheme", "http"), (":authority", "t")]
    elif kind == "crlf-in-value": h = base + [("x-a", "1\r\nx-injected: 1")]
    elif kind == "nul-in-value": h = base + [("x-a", "1\x00")]
    elif kind == "non-token-name": h = base + [("x@a", "1")]
    elif kind == "space-before-value": h = base + [("x-a", " 1")]
    elif kind == "tab-after-value": h = base + [("x-a", "1\t")]
    elif kind == "space-after-trailer-value": h = post; body = b"abc"; trailers = [("x-t", "1 ")]
    elif kind == "body-longer": h = post + [("content-length", "3")]; body = b"12345"
    elif kind == "body-shorter": h = post + [("content-length", "10")]; body = b"123"
    elif kind == "length-without-body": h = post + [("content-length", "5")]
    elif kind == "uppercase-trailer": h = post; body = b"abc"; trailers = [("X-Upper", "1")]
    elif kind == "pseudo-in-trailers": h = post; body = b"abc"; trailers = [(":path", "/")]
    else: raise SystemExit("unknown kind")
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, h, end_stream=body is None); s.sendall(c.data_to_send())
    if body is not None:
        c.send_data(sid, body, end_stream=trailers is None)
        if trailers: c.send_headers(sid, trailers, end_stream=True)
        s.sendall(c.data_to_send())
    r = response(s, c, sid)
    again = response(s, c, request(s, c, "/again"))
    result = {"status": r["status"], "reset": r["reset"], "closed": r["closed"], "next_status": again["status"]}
elif MODE == "malformed-flood":
    # N malformed requests on one connection (each a stream error), then whether the connection was cut.
    def abuse():
        s, c = connect()
        try:
            for i in range(int(ARGS[0])):
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t"), ("X-Upper", "1")], end_stream=True)
                s.sendall(c.data_to_send())
        except Exception:
            pass
        code, closed = wait_end(s, c)
        return {"goaway": code, "closed": closed}
    result = with_bystander(abuse)
elif MODE == "goaway-then-eof":
    # ARGS[0] malformed requests (past max_glitches) and ~260 KB of harmless
    # frames after them, all written before reading: the GOAWAY must arrive,
    # then the end of the stream (FIN), not a reset that can take the GOAWAY with it.
    s, c = connect()
    for i in range(int(ARGS[0])):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "t"), ("X-Upper", "1")], end_stream=True)
    w = WindowUpdateFrame(0); w.window_increment = 1
    send_error = None
    try:
        s.sendall(c.data_to_send() + w.serialize() * 20000)
    except OSError as e:
        send_error = type(e).__name__
    events, end = [], "timeout"
    s.settimeout(5)
    while True:
        try:
            data = s.recv(65536)
        except socket.timeout:
            break
        except OSError as e:
            end = type(e).__name__; break
        if not data:
            end = "eof"; break
        try: events += c.receive_data(data)
        except Exception as e: events.append(("client-error", str(e)))
    result = {"goaway": goaway_of(events), "end": end, "send_error": send_error}
elif MODE == "closed-stream":
    s, c = connect()
    sid = request(s, c, "/")
    first = response(s, c, sid)
    d = DataFrame(sid); d.data = b"late"; d.flags.add("END_STREAM")
    s.sendall(d.serialize())
    events, closed = pump(s, c, lambda ev: any(isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated)) for e in ev), 3)
    reset = [int(e.error_code) for e in events if isinstance(e, h2.events.StreamReset)]
    result = {"first": first["status"], "reset": reset[0] if reset else None, "goaway": goaway_of(events), "closed": closed}
elif MODE == "bad-settings-first":
    # The preface must be followed by SETTINGS (RFC 9113 §3.4): a PING first is a PROTOCOL_ERROR.
    s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
    p = PingFrame(0); p.opaque_data = b"12345678"
    s.sendall(PREFACE + p.serialize())
    from hyperframe.frame import Frame, GoAwayFrame
    buf = b""; goaway = None; closed = False; deadline = time.time() + 3
    while time.time() < deadline and goaway is None:
        s.settimeout(0.5)
        try: data = s.recv(65536)
        except socket.timeout: continue
        except ConnectionResetError: closed = True; break
        if not data: closed = True; break
        buf += data
        while len(buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length: break
            f.parse_body(memoryview(buf[9:9 + length])); buf = buf[9 + length:]
            if isinstance(f, GoAwayFrame): goaway = f.error_code
    result = {"goaway": goaway, "closed": closed}
elif MODE == "idle":
    s, c = connect()
    r = response(s, c, request(s, c, "/"))
    code, closed = wait_end(s, c, float(ARGS[0]))
    result = {"status": r["status"], "goaway": code, "closed": closed}
elif MODE == "ping-silent":
    # Answers nothing (not even PINGs) after its first request.
    s, c = connect()
    r = response(s, c, request(s, c, "/"))
    s.settimeout(float(ARGS[0])); got_ping = False; closed = False; t0 = time.time()
    from hyperframe.frame import Frame
    buf = b""
    while time.time() - t0 < float(ARGS[0]):
        try: data = s.recv(65536)
        except socket.timeout: break
        except ConnectionResetError: closed = True; break
        if not data: closed = True; break
        buf += data
        while len(buf) >= 9:
            f, length = Frame.parse_frame_header(memoryview(buf[:9]))
            if len(buf) < 9 + length: break
            f.parse_body(memoryview(buf[9:9 + length])); buf = buf[9 + length:]
            if isinstance(f, PingFrame) and "ACK" not in f.flags: got_ping = True
    result = {"status": r["status"], "got_ping": got_ping, "closed": closed}
print(json.dumps(result))
"""#
}
