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
    /// The prefix and its `-`, as 9 ASCII bytes.
    private var prefix: (UInt64, UInt8) = (0, 0)
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
            packed |= UInt64(Self.digit(UInt64.random(in: 0..<62))) << (8 * UInt64(k))
        }
        prefix = (packed, UInt8(ascii: "-"))
        counter = 0
    }

    /// `0-9A-Za-z` for 0..<62.
    @inline(__always)
    private static func digit(_ v: UInt64) -> UInt8 {
        v < 10 ? UInt8(truncatingIfNeeded: v) &+ 48
            : v < 36 ? UInt8(truncatingIfNeeded: v) &+ 55 : UInt8(truncatingIfNeeded: v) &+ 61
    }

    // Inlined: a call kept the generator retained across it (a
    // retain/release pair per request, callgrind).
    @inline(__always)
    func next() -> String {
        counter &+= 1
        if counter >= Self.counterLimit { drawPrefix(); counter = 1 }
        var value = counter
        var digits = 1
        while value >= 62 { value /= 62; digits += 1 }
        let total = 9 + digits
        let counter = self.counter
        let prefix = self.prefix
        return String(unsafeUninitializedCapacity: total) { out in
            let base = UnsafeMutableRawPointer(out.baseAddress!)
            base.storeBytes(of: prefix.0.littleEndian, as: UInt64.self)
            out[8] = prefix.1
            var v = counter
            var i = total - 1
            repeat {
                out[i] = Self.digit(v % 62)
                v /= 62
                i -= 1
            } while i >= 9
            return total
        }
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
