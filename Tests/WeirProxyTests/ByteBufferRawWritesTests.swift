import NIOCore
@testable import WeirProxy
import XCTest

/// `writeReserved` / `writeReadableBytes` (the head writers' and the
/// coalesced body's appends) against NIO's own writes: same bytes, same
/// indices, and a buffer whose storage is shared is copied, not written
/// through.
final class ByteBufferRawWritesTests: XCTestCase {
    func testWriteReservedAppendsAtTheWriterIndexLikeWriteBytes() {
        var viaNIO = ByteBuffer(string: "xxHTTP/1.1 200 OK\r\n")
        viaNIO.moveReaderIndex(forwardBy: 2)
        var viaRaw = viaNIO
        let tail = Array("date: now\r\n\r\n".utf8)
        viaNIO.writeBytes(tail)
        let written = viaRaw.writeReserved(capacity: tail.count + 10) { dst in
            tail.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress!, byteCount: tail.count) }
            return tail.count
        }
        XCTAssertEqual(written, tail.count)
        XCTAssertEqual(viaRaw, viaNIO)
        XCTAssertEqual(viaRaw.readerIndex, 2)
        XCTAssertEqual(String(buffer: viaRaw), "HTTP/1.1 200 OK\r\ndate: now\r\n\r\n")
    }

    func testSharedStorageIsCopiedNotWrittenThrough() {
        var original = ByteBuffer(string: "head")
        original.reserveCapacity(64) // room, so only sharing forces the copy
        let shared = original
        original.writeReadableBytes(of: ByteBuffer(string: "+body"))
        XCTAssertEqual(String(buffer: original), "head+body")
        XCTAssertEqual(String(buffer: shared), "head")
        XCTAssertEqual(shared.writerIndex, 4)
    }

    func testReadableBytesOfASliceAndEmptyBuffers() {
        var source = ByteBuffer(string: "skip-body-rest")
        source.moveReaderIndex(forwardBy: 5)
        let body = source.getSlice(at: 5, length: 4)!
        var out = ByteBuffer()
        out.writeReadableBytes(of: body)
        out.writeReadableBytes(of: ByteBuffer())
        XCTAssertEqual(String(buffer: out), "body")
        XCTAssertEqual(body.readerIndex, 0) // the source is not consumed
        // Growing past the capacity keeps what was written.
        let big = ByteBuffer(repeating: 0x61, count: 5000)
        out.writeReadableBytes(of: big)
        XCTAssertEqual(out.readableBytes, 5004)
        XCTAssertEqual(out.getString(at: 0, length: 6), "bodyaa")
    }
}
