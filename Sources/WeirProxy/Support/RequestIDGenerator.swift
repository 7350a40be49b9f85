/// Request ids: a random prefix chosen per event loop plus a per-loop
/// counter, so making one costs a counter increment and no lock, no random
/// call and no heap allocation per request.
///
/// Shape: `<8 prefix chars>-<1...6 counter chars>`, base 62 (`0-9A-Za-z`),
/// e.g. `q3ZpK0aF-1Az`. At most 15 bytes, so Swift stores the String inline
/// (a "small string": no heap storage, no reference counting wherever the id
/// is copied: the exchange, the upstream `x-request-id`, logs). When the
/// counter would need a 7th character the generator draws a new prefix and
/// starts again; ids stay unique across loops and restarts by the random
/// prefix (62^8, about 2^47.6).
/// Only ever used on its own event loop.
final class RequestIDGenerator {
    /// The prefix's 8 ASCII bytes, character k in byte k.
    private var prefix: UInt64 = 0
    private var counter: UInt64 = 0
    static let counterLimit: UInt64 = 56_800_235_584   // 62^6

    /// `counter`: where the count starts (tests reach the prefix change).
    init(counter: UInt64 = 0) {
        drawPrefix()
        self.counter = counter
    }

    private func drawPrefix() {
        // Character k in byte k of the little-endian word (stored as such).
        var packed: UInt64 = 0
        for k in 0..<8 {
            packed |= UInt64(RequestID.digit(UInt64.random(in: 0..<62))) << (8 * UInt64(k))
        }
        prefix = packed
        counter = 0
    }

    // Inlined: a call kept the generator retained across it (a
    // retain/release pair per request, callgrind). The prefix change is a
    // call of its own on a path that returns: a call on the shared path
    // (`drawPrefix` then carrying on) kept the generator retained there too.
    @inline(__always)
    func nextID() -> RequestID {
        let next = counter &+ 1
        guard next < Self.counterLimit else { return firstIDOfNewPrefix() }
        counter = next
        var value = next
        var digits = 1
        while value >= 62 { value /= 62; digits += 1 }
        return RequestID(prefix: prefix, counter: next, digits: digits)
    }

    @inline(never)
    private func firstIDOfNewPrefix() -> RequestID {
        drawPrefix()
        counter = 1
        return RequestID(prefix: prefix, counter: 1, digits: 1)
    }

    /// The next id as a String (`nextID().string`).
    func next() -> String { nextID().string }
}

/// A request id before it is a String: its generator's prefix and count.
/// The upstream head's X-Request-Id is written from it as bytes
/// (`write(to:)`, `UpstreamOwnFields`), so the usual request makes no
/// String of its id: that cost ~150 instructions per request (UTF-8
/// validation in `String(unsafeUninitializedCapacity:)`, callgrind).
/// Logs, plugins and error pages ask for `Exchange.id`, made on first use.
struct RequestID {
    /// The 8 prefix characters, character k in byte k (little-endian).
    let prefix: UInt64
    let counter: UInt64
    /// How many base-62 digits `counter` takes (1...6).
    let digits: Int

    /// `<8 prefix chars>-<digits>`.
    var byteCount: Int { 9 + digits }

    /// Writes the id's `byteCount` bytes at `out`.
    @inline(__always)
    func write(to out: UnsafeMutableRawPointer) {
        out.storeBytes(of: prefix.littleEndian, as: UInt64.self)
        out.storeBytes(of: UInt8(ascii: "-"), toByteOffset: 8, as: UInt8.self)
        var v = counter
        var i = 8 + digits
        repeat {
            out.storeBytes(of: Self.digit(v % 62), toByteOffset: i, as: UInt8.self)
            v /= 62
            i -= 1
        } while i >= 9
    }

    var string: String {
        let total = byteCount
        return String(unsafeUninitializedCapacity: total) { out in
            write(to: UnsafeMutableRawPointer(out.baseAddress!))
            return total
        }
    }

    /// `0-9A-Za-z` for 0..<62.
    @inline(__always)
    static func digit(_ v: UInt64) -> UInt8 {
        v < 10 ? UInt8(truncatingIfNeeded: v) &+ 48
            : v < 36 ? UInt8(truncatingIfNeeded: v) &+ 55 : UInt8(truncatingIfNeeded: v) &+ 61
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Wall-clock seconds since 1970 (for access records), without Foundation.
func wallClockSeconds() -> Double {
    var spec = timespec()
    clock_gettime(CLOCK_REALTIME, &spec)
    return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
}
