/// Request ids: a random 48-bit prefix chosen once per event loop plus a
/// per-loop counter, so making one costs a counter increment and one small
/// string, with no lock and no random call per request.
/// Shape: `<12 hex prefix>-<hex counter>`, e.g. `3f9a0c1b22de-1a`.
/// Only ever used on its own event loop.
final class RequestIDGenerator {
    private let prefix: [UInt8]
    private var counter: UInt64 = 0

    init() {
        var p: [UInt8] = []
        p.reserveCapacity(13)
        let random = UInt64.random(in: 0..<(1 << 48))
        for shift in stride(from: 44, through: 0, by: -4) {
            p.append(Self.hex[Int((random >> UInt64(shift)) & 0xf)])
        }
        p.append(UInt8(ascii: "-"))
        self.prefix = p
    }

    private static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    func next() -> String {
        counter &+= 1
        var value = counter
        var digits = 1
        while value >= 16 { value >>= 4; digits += 1 }
        let total = prefix.count + digits
        let counter = self.counter
        return String(unsafeUninitializedCapacity: total) { out in
            for i in 0..<prefix.count { out[i] = prefix[i] }
            var v = counter
            var i = total - 1
            repeat {
                out[i] = Self.hex[Int(v & 0xf)]
                v >>= 4
                i -= 1
            } while i >= prefix.count
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
