import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
@testable import WeirProxy
import XCTest

/// `SoleHandlerIO` on a real loopback connection: direct `send(2)`s and
/// NIO's queue must keep the byte stream in order whatever the socket
/// takes (whole, part, nothing), and direct sends resume once NIO's queue
/// is empty.
final class SoleHandlerIOTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var server: Channel?

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        try? server?.close().wait()
        try? group?.syncShutdownGracefully()
    }

    /// The only handler of an accepted connection; the test drives its I/O.
    final class Writer: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = ByteBuffer
        let io = SoleHandlerIO()
        let soleHandler: Bool
        var context: ChannelHandlerContext?
        init(soleHandler: Bool) { self.soleHandler = soleHandler }
        func handlerAdded(context: ChannelHandlerContext) {
            self.context = context
            io.attach(context, soleHandler: soleHandler)
        }
        func handlerRemoved(context: ChannelHandlerContext) {
            io.detach()
            self.context = nil
        }
    }

    /// A connection whose server side is a `Writer` with a small send
    /// buffer, and whose client side is a blocking socket with a small
    /// receive buffer (so a few hundred KB fill both).
    private func connect(soleHandler: Bool) throws -> (Writer, BlockingSocket) {
        let accepted = group.next().makePromise(of: Writer.self)
        let server = try ServerBootstrap(group: group)
            .childChannelOption(.socketOption(.so_sndbuf), value: 8192)
            .childChannelInitializer { channel in
                let writer = Writer(soleHandler: soleHandler)
                do {
                    try channel.pipeline.syncOperations.addHandler(writer)
                    accepted.succeed(writer)
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        self.server = server
        let client = try BlockingSocket(port: server.localAddress!.port!)
        var small: Int32 = 8192
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        return (try accepted.futureResult.wait(), client)
    }

    /// `count` bytes of a pattern that shows any reordering or loss.
    private static func pattern(from start: Int, count: Int) -> [UInt8] {
        (start..<start + count).map { UInt8(truncatingIfNeeded: $0 % 251) }
    }

    /// Writes `sizes` as buffers of the pattern from `offset` on (flushing
    /// after each `flushEvery`), on the loop; returns the bytes written and
    /// whether NIO may hold some after the last flush.
    private func writeAll(_ writer: Writer, from offset: Int = 0, sizes: [Int], flushEvery: Int, promiseAt: Int? = nil,
                          written: EventLoopPromise<Void>? = nil) throws -> (expected: [UInt8], queued: Bool) {
        try group.next().submit { () -> ([UInt8], Bool) in
            let context = writer.context!
            var expected: [UInt8] = []
            for (i, size) in sizes.enumerated() {
                let bytes = Self.pattern(from: offset + expected.count, count: size)
                expected += bytes
                let promise = i == promiseAt ? written : nil
                writer.io.write(context.channel.allocator.buffer(bytes: bytes), context: context, promise: promise)
                if (i + 1) % flushEvery == 0 || i == sizes.count - 1 { writer.io.flush(context: context) }
            }
            return (expected, writer.io.nioMayHoldWrites)
        }.wait()
    }

    func testStreamStaysInOrderWhenTheSocketFillsAndDirectSendsResume() throws {
        let (writer, client) = try connect(soleHandler: true)
        XCTAssertTrue(try group.next().submit { writer.io.isDirect }.wait())
        // Small buffers (held and sent directly) until the socket is full,
        // then the rest queues in NIO; some flushes carry two buffers, some
        // buffers are above the held limit, one write has a promise.
        var sizes: [Int] = []
        for i in 0..<20 { sizes.append([700, 5000, 16 * 1024, 16 * 1024 + 1, 40_000][i % 5]) }
        let written = group.next().makePromise(of: Void.self)
        let first = try writeAll(writer, sizes: sizes, flushEvery: 1, promiseAt: 15, written: written)
        XCTAssertTrue(first.queued, "the peer reads nothing yet: NIO must hold the rest")
        let second = try writeAll(writer, from: first.expected.count, sizes: [300, 900, 12_000], flushEvery: 2)
        XCTAssertTrue(second.queued, "still behind NIO's queue")
        let expected = first.expected + second.expected
        // A bigger window to read it all quickly (tiny ones wait for delayed ACKs).
        var large: Int32 = 4 << 20
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &large, socklen_t(MemoryLayout<Int32>.size))
        XCTAssertEqual(client.readExactly(expected.count), expected)
        XCTAssertNoThrow(try written.futureResult.wait())
        // Drained: a small write goes straight to the socket again.
        let third = try writeAll(writer, from: expected.count, sizes: [1000], flushEvery: 1)
        XCTAssertFalse(third.queued, "NIO's queue is empty: direct sends resume")
        XCTAssertEqual(client.readExactly(1000), third.expected)
    }

    func testNotSoleHandlerGoesThroughThePipeline() throws {
        let (writer, client) = try connect(soleHandler: false)
        XCTAssertFalse(try group.next().submit { writer.io.isDirect }.wait())
        let result = try writeAll(writer, sizes: [10, 20_000, 5], flushEvery: 2)
        XCTAssertFalse(result.queued, "not direct: nothing is tracked")
        XCTAssertEqual(client.readExactly(result.expected.count), result.expected)
    }

    func testHeldBufferGoesToNIOWhenTheHandlerLeaves() throws {
        let (writer, client) = try connect(soleHandler: true)
        try group.next().submit {
            let context = writer.context!
            writer.io.write(context.channel.allocator.buffer(string: "held"), context: context, promise: nil)
            // Removed before any flush: the held bytes go to NIO unflushed,
            // and the channel's next flush sends them.
            let channel = context.channel
            channel.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            channel.writeAndFlush(channel.allocator.buffer(string: "+after"), promise: nil)
        }.wait()
        XCTAssertEqual(client.readExactly(10).map { String(decoding: $0, as: UTF8.self) }, "held+after")
        XCTAssertTrue(try group.next().submit { !writer.io.isDirect }.wait())
    }
}
