import Foundation

/// Keys and signatures made by the `openssl` command line tool, so the
/// signature checks under test (weir.crypto.verify, the jwt plugin) are
/// exercised against an independent implementation. Generates one RSA-2048,
/// one EC key pair per curve (P-256, P-384, P-521) and one Ed25519 key pair
/// in a temporary folder per instance.
public final class OpenSSLSigner {
    public let folder: URL

    /// The NIST curves, by their JWK `crv` name.
    public enum Curve: String, CaseIterable {
        case p256 = "P-256", p384 = "P-384", p521 = "P-521"
        /// Bytes of one coordinate (and of r and s in a JOSE signature).
        public var size: Int { self == .p256 ? 32 : self == .p384 ? 48 : 66 }
        public var hashBits: Int { self == .p256 ? 256 : self == .p384 ? 384 : 512 }
        var file: String { self == .p256 ? "ec" : rawValue.lowercased() }
    }

    public init() throws {
        folder = FileManager.default.temporaryDirectory.appendingPathComponent("weir-openssl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try run(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path("rsa.pem")])
        try run(["pkey", "-in", path("rsa.pem"), "-pubout", "-out", path("rsa.pub")])
        try run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path("ec.pem")])
        try run(["pkey", "-in", path("ec.pem"), "-pubout", "-out", path("ec.pub")])
        for curve in [Curve.p384, .p521] {
            try run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:\(curve.rawValue)", "-out", path(curve.file + ".pem")])
            try run(["pkey", "-in", path(curve.file + ".pem"), "-pubout", "-out", path(curve.file + ".pub")])
        }
        try run(["genpkey", "-algorithm", "ED25519", "-out", path("ed25519.pem")])
        try run(["pkey", "-in", path("ed25519.pem"), "-pubout", "-out", path("ed25519.pub")])
    }

    deinit { try? FileManager.default.removeItem(at: folder) }

    public var rsaPublicPEM: String { (try? String(contentsOfFile: path("rsa.pub"), encoding: .utf8)) ?? "" }
    public var ecPublicPEM: String { ecPublicPEM(.p256) }
    public func ecPublicPEM(_ curve: Curve) -> String { (try? String(contentsOfFile: path(curve.file + ".pub"), encoding: .utf8)) ?? "" }
    public var ed25519PublicPEM: String { (try? String(contentsOfFile: path("ed25519.pub"), encoding: .utf8)) ?? "" }

    /// `{kty: RSA, n, e}` (and `kid`, `alg` when given) as a JSON object text.
    public func rsaJWK(kid: String?, alg: String? = nil) throws -> [String: String] {
        let out = String(decoding: try run(["rsa", "-pubin", "-in", path("rsa.pub"), "-modulus", "-noout"]), as: UTF8.self)
        let hex = out.trimmingCharacters(in: .whitespacesAndNewlines).replacingOccurrences(of: "Modulus=", with: "")
        var jwk = ["kty": "RSA", "n": Self.base64URL(Self.bytes(hex: hex)), "e": "AQAB"]
        if let kid { jwk["kid"] = kid }
        if let alg { jwk["alg"] = alg }
        return jwk
    }

    /// `{kty: EC, crv, x, y}`: the DER public key ends with x || y.
    public func ecJWK(kid: String?, curve: Curve = .p256, alg: String? = nil) throws -> [String: String] {
        let der = try run(["pkey", "-pubin", "-in", path(curve.file + ".pub"), "-outform", "DER"])
        let n = curve.size
        let point = Array(der.suffix(2 * n))
        var jwk = ["kty": "EC", "crv": curve.rawValue, "x": Self.base64URL(Array(point[0..<n])), "y": Self.base64URL(Array(point[n..<(2 * n)]))]
        if let kid { jwk["kid"] = kid }
        if let alg { jwk["alg"] = alg }
        return jwk
    }

    /// `{kty: OKP, crv: Ed25519, x}` (RFC 8037): the DER public key ends with the 32-byte key.
    public func ed25519JWK(kid: String?) throws -> [String: String] {
        let der = try run(["pkey", "-pubin", "-in", path("ed25519.pub"), "-outform", "DER"])
        var jwk = ["kty": "OKP", "crv": "Ed25519", "x": Self.base64URL(Array(der.suffix(32)))]
        if let kid { jwk["kid"] = kid }
        return jwk
    }

    /// RSASSA-PKCS1-v1_5 with SHA-256/384/512 (`bits`), raw signature bytes.
    public func signRSA(_ data: [UInt8], bits: Int = 256) throws -> [UInt8] {
        try run(["dgst", "-sha\(bits)", "-sign", path("rsa.pem")], input: data)
    }

    /// RSASSA-PSS with SHA-256/384/512 (`bits`), MGF1 of the same hash and
    /// a salt as long as the hash (JWA PS256/384/512), raw signature bytes.
    public func signRSAPSS(_ data: [UInt8], bits: Int = 256) throws -> [UInt8] {
        try run(["dgst", "-sha\(bits)", "-sign", path("rsa.pem"), "-sigopt", "rsa_padding_mode:pss",
                 "-sigopt", "rsa_pss_saltlen:digest"], input: data)
    }

    /// ECDSA P-256 SHA-256 in the JOSE form (r || s, 32 bytes each).
    public func signES256(_ data: [UInt8]) throws -> [UInt8] { try signECDSA(data, curve: .p256) }

    /// ECDSA on `curve` with its JWA hash (ES256/384/512) in the JOSE form (r || s).
    public func signECDSA(_ data: [UInt8], curve: Curve) throws -> [UInt8] {
        let der = try run(["dgst", "-sha\(curve.hashBits)", "-sign", path(curve.file + ".pem")], input: data)
        return try Self.joseSignature(fromDER: der, size: curve.size)
    }

    /// Ed25519 (JWA EdDSA), 64 bytes. openssl signs raw input from a file only.
    public func signEd25519(_ data: [UInt8]) throws -> [UInt8] {
        let input = folder.appendingPathComponent("ed25519-input-\(UUID().uuidString)")
        try Data(data).write(to: input)
        defer { try? FileManager.default.removeItem(at: input) }
        return try run(["pkeyutl", "-sign", "-inkey", path("ed25519.pem"), "-rawin", "-in", input.path])
    }

    /// HMAC with SHA-256/384/512 (`bits`) under a text key.
    public func hmac(_ data: [UInt8], key: String, bits: Int = 256) throws -> [UInt8] {
        try run(["dgst", "-sha\(bits)", "-hmac", key, "-binary"], input: data)
    }

    /// A compact JWS: base64url(header).base64url(claims).base64url(sign(input)).
    public static func jwt(header: [String: Any], claims: [String: Any], sign: ([UInt8]) throws -> [UInt8]) throws -> String {
        let h = base64URL(Array(try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])))
        let c = base64URL(Array(try JSONSerialization.data(withJSONObject: claims, options: [.sortedKeys])))
        let input = h + "." + c
        return input + "." + base64URL(try sign(Array(input.utf8)))
    }

    public static func base64URL(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    static func bytes(hex: String) -> [UInt8] {
        var out: [UInt8] = []
        var chars = Array(hex.utf8)[...]
        while chars.count >= 2 {
            out.append(UInt8(String(decoding: chars.prefix(2), as: UTF8.self), radix: 16) ?? 0)
            chars = chars.dropFirst(2)
        }
        return out
    }

    /// SEQUENCE { INTEGER r, INTEGER s } -> r || s, each left-padded to `size` bytes.
    static func joseSignature(fromDER der: [UInt8], size: Int = 32) throws -> [UInt8] {
        struct BadDER: Error {}
        var i = 0
        func length() throws -> Int {
            guard i < der.count else { throw BadDER() }
            let first = Int(der[i]); i += 1
            if first < 0x80 { return first }
            var n = 0
            for _ in 0..<(first & 0x7f) { guard i < der.count else { throw BadDER() }; n = n << 8 | Int(der[i]); i += 1 }
            return n
        }
        func integer() throws -> [UInt8] {
            guard i < der.count, der[i] == 0x02 else { throw BadDER() }
            i += 1
            let n = try length()
            guard i + n <= der.count else { throw BadDER() }
            var value = Array(der[i..<(i + n)]); i += n
            while value.count > size, value.first == 0 { value.removeFirst() }
            guard value.count <= size else { throw BadDER() }
            return [UInt8](repeating: 0, count: size - value.count) + value
        }
        guard der.first == 0x30 else { throw BadDER() }
        i = 1
        _ = try length()
        return try integer() + integer()
    }

    private func path(_ name: String) -> String { folder.appendingPathComponent(name).path }

    @discardableResult
    private func run(_ arguments: [String], input: [UInt8]? = nil) throws -> [UInt8] {
        struct OpenSSLFailed: Error, CustomStringConvertible { let description: String }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        let stdout = Pipe(), stdin = Pipe()
        process.standardOutput = stdout
        process.standardInput = stdin
        process.standardError = FileHandle.nullDevice
        try process.run()
        if let input { stdin.fileHandleForWriting.write(Data(input)) }
        try stdin.fileHandleForWriting.close()
        let out = stdout.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw OpenSSLFailed(description: "openssl \(arguments.joined(separator: " ")) exited \(process.terminationStatus)")
        }
        return Array(out)
    }
}
