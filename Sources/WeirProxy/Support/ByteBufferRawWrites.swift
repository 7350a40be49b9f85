import NIOCore

/// Appends written through the storage pointer. NIO 2.101's
/// `writeWithUnsafeMutableBytes`, `writeBytes(UnsafeRawBufferPointer)` and
/// `writeImmutableBuffer` slice the storage with a generic `dropFirst` that is
/// not inlined (~55 instructions a call under callgrind, on top of their own
/// checks); the hot per-request writes reserve once and move the writer
/// index themselves instead (the same as `HTTP2FieldList.add`).
extension ByteBuffer {
    /// Reserves `capacity` writable bytes, calls `body` with the pointer at
    /// the writer index, and moves the writer index by what `body` returns
    /// (at most `capacity`).
    @inline(__always)
    @discardableResult
    mutating func writeReserved(capacity: Int, _ body: (UnsafeMutableRawPointer) -> Int) -> Int {
        reserveCapacity(minimumWritableBytes: capacity)
        let start = writerIndex
        let written = withVeryUnsafeMutableBytes { storage in body(storage.baseAddress! + start) }
        precondition(written <= capacity, "wrote past the reserved bytes")
        moveWriterIndex(forwardBy: written)
        return written
    }

    /// Appends `other`'s readable bytes (its reader index is not moved).
    @inline(__always)
    mutating func writeReadableBytes(of other: ByteBuffer) {
        let count = other.readableBytes
        guard count > 0 else { return }
        other.withUnsafeReadableBytes { src in
            writeReserved(capacity: count) { dst in
                dst.copyMemory(from: src.baseAddress!, byteCount: count)
                return count
            }
        }
    }
}
