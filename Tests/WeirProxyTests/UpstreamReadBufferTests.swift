import NIOCore
import NIOEmbedded
@testable import WeirProxy
import WeirCore
import XCTest

/// The upstream handler lets go of a read's buffer once it has parsed all
/// of it. NIOSSLHandler decrypts every read into one 32 KB buffer that it
/// reuses only while nobody else holds it: a handler that kept the drained
/// buffer made it copy the whole 32 KB once per response on TLS upstreams.
final class UpstreamReadBufferTests: XCTestCase {
    /// Keeps what the handler reported as plain values (no buffers), so
    /// the test itself holds no reference to the read.
    private final class Recorder: UpstreamConnectionDelegate {
        let loopClock = LoopClock()
        var statuses: [Int] = []
        var bodyBytes = 0
        var ends = 0
        func upstreamRead(_ part: UpstreamResponsePart, on connection: UpstreamConnection) {
            switch part {
            case .head(let head): statuses.append(Int(head.status))
            case .body(let bytes): bodyBytes += bytes.readableBytes
            case .end: ends += 1
            }
        }
        func upstreamReadComplete(on connection: UpstreamConnection) {}
        func upstreamWritabilityChanged(on connection: UpstreamConnection) {}
        func upstreamClosed(_ connection: UpstreamConnection, error: Error?) {}
    }

    func testDrainedReadBufferIsNotKept() throws {
        let loop = EmbeddedEventLoop()
        let pool = TargetPool(targetIndex: 0, target: TargetConfig(address: HostPort(host: "127.0.0.1", port: 9)),
                              pool: ConnectionPoolConfig(), connectTimeout: .seconds(1), loop: loop)
        let handler = UpstreamHandler()
        let channel = EmbeddedChannel(handler: handler, loop: loop)
        defer { _ = try? channel.finish() }
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
        let connection = UpstreamConnection(channel: channel, handler: handler, targetIndex: 0, pool: pool)
        let recorder = Recorder()
        connection.attach(recorder)

        for round in 1...2 {
            handler.expectResponse(to: .get)
            // Like NIOSSL's plaintext buffer: large, one response at its start.
            var read = ByteBufferAllocator().buffer(capacity: 32 * 1024)
            read.writeString("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
            let storage = read.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
            try channel.writeInbound(read)
            XCTAssertEqual(recorder.ends, round, "the whole response was parsed")
            // Writing into the buffer again (what NIOSSL does on its next
            // decode) must not copy it: nobody else holds its storage.
            read.clear()
            let afterWrite = read.withUnsafeMutableWritableBytes { UInt(bitPattern: $0.baseAddress) }
            XCTAssertEqual(afterWrite, storage, "round \(round): the handler still holds the drained read buffer")
        }
        XCTAssertEqual(recorder.statuses, [200, 200])
        XCTAssertEqual(recorder.bodyBytes, 10)
    }
}
