import CLua
import CLuaShims
import Crypto
import _CryptoExtras
import Foundation

// weir.crypto's Swift half (the C half, Sources/CLuaShims/clib.c, has SHA-256, HMAC-SHA256,
// base64, random bytes): what needs real public-key code or more hashes.
// swift-crypto (BoringSSL inside) does the arithmetic: signature checks are
// the kind of code that must not be home-made.
//
//   weir.crypto.hmac(hash, key, data)            hash: "sha256" | "sha384" | "sha512"
//   weir.crypto.digest(hash, data)               same hashes
//   weir.crypto.pbkdf2(password, salt, iterations, length [, hash])
//   weir.crypto.verify(scheme, public_key, data, signature)
//       scheme: "rsa-pkcs1-sha256|384|512" | "rsa-pss-sha256|384|512" | "ecdsa-p256-sha256"
//               | "ecdsa-p384-sha384" | "ecdsa-p521-sha512" | "ed25519"
//       public_key: a PEM string, or a JWK table { kty = "RSA", n, e } /
//               { kty = "EC", crv = "P-256"|"P-384"|"P-521", x, y } / { kty = "OKP", crv = "Ed25519", x }

/// The bytes of the Lua string at `index` (binary safe, no copy), or nil if
/// the value is not a string. Valid while the value stays on the stack.
@inline(__always)
func luaBytes(at index: Int32, on L: LuaThread) -> UnsafeRawBufferPointer? {
    var length = 0
    guard let p = weir_tostring(L, index, &length) else { return nil }
    return UnsafeRawBufferPointer(start: p, count: length)
}

@inline(__always)
func pushBytes<C: ContiguousBytes>(_ bytes: C, on L: LuaThread) {
    bytes.withUnsafeBytes { buf in
        _ = lua_pushlstring(L, buf.baseAddress?.assumingMemoryBound(to: CChar.self), buf.count)
    }
}

/// Hashes, HMACs, PBKDF2 and signature checks used by the SDK and by
/// consumer loading (basic-auth passwords are hashed when the config loads).
public enum WeirCrypto {
    public enum Hash: String, Sendable {
        case sha256, sha384, sha512
    }

    public static func hmac(_ hash: Hash, key: UnsafeRawBufferPointer, data: UnsafeRawBufferPointer) -> [UInt8] {
        let key = SymmetricKey(data: key)
        switch hash {
        case .sha256: return Array(HMAC<SHA256>.authenticationCode(for: data, using: key))
        case .sha384: return Array(HMAC<SHA384>.authenticationCode(for: data, using: key))
        case .sha512: return Array(HMAC<SHA512>.authenticationCode(for: data, using: key))
        }
    }

    public static func digest(_ hash: Hash, data: UnsafeRawBufferPointer) -> [UInt8] {
        switch hash {
        case .sha256: return Array(SHA256.hash(data: data))
        case .sha384: return Array(SHA384.hash(data: data))
        case .sha512: return Array(SHA512.hash(data: data))
        }
    }

    /// PBKDF2-HMAC (RFC 8018). `iterations` is the caller's choice (no
    /// minimum is imposed here; the config loader applies its own floor).
    public static func pbkdf2<P: DataProtocol, S: DataProtocol>(password: P, salt: S, iterations: Int,
                                                               length: Int, hash: Hash = .sha256) throws -> [UInt8] {
        let function: KDF.Insecure.PBKDF2.HashFunction
        switch hash {
        case .sha256: function = .sha256
        case .sha384: function = .sha384
        case .sha512: function = .sha512
        }
        let key = try KDF.Insecure.PBKDF2.deriveKey(from: password, salt: salt, using: function,
                                                    outputByteCount: length, unsafeUncheckedRounds: iterations)
        return key.withUnsafeBytes { Array($0) }
    }

    /// A parsed public key for signature checks.
    public enum PublicKey {
        case rsa(_RSA.Signing.PublicKey)
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
        case p521(P521.Signing.PublicKey)
        case ed25519(Curve25519.Signing.PublicKey)
    }

    /// A signature scheme: the key type, padding and hash are all fixed by
    /// the name, so a key of another type never matches (no algorithm confusion).
    public enum Scheme: String, Sendable {
        case rsaPKCS1SHA256 = "rsa-pkcs1-sha256"
        case rsaPKCS1SHA384 = "rsa-pkcs1-sha384"
        case rsaPKCS1SHA512 = "rsa-pkcs1-sha512"
        /// RSASSA-PSS with MGF1 of the same hash and a salt as long as the hash (JWA PS256/384/512).
        case rsaPSSSHA256 = "rsa-pss-sha256"
        case rsaPSSSHA384 = "rsa-pss-sha384"
        case rsaPSSSHA512 = "rsa-pss-sha512"
        case ecdsaP256SHA256 = "ecdsa-p256-sha256"
        case ecdsaP384SHA384 = "ecdsa-p384-sha384"
        case ecdsaP521SHA512 = "ecdsa-p521-sha512"
        /// Ed25519 (RFC 8032) over the data itself (JWA EdDSA with crv Ed25519).
        case ed25519 = "ed25519"
    }

    /// Parses a PEM public key ("BEGIN PUBLIC KEY"; RSA also "BEGIN RSA PUBLIC KEY"):
    /// RSA (keys under 2048 bits are refused by swift-crypto), EC P-256/P-384/P-521, Ed25519.
    public static func publicKey(pem: String) throws -> PublicKey {
        if pem.contains("RSA PUBLIC KEY") { return .rsa(try _RSA.Signing.PublicKey(pemRepresentation: pem)) }
        if let key = try? P256.Signing.PublicKey(pemRepresentation: pem) { return .p256(key) }
        if let key = try? P384.Signing.PublicKey(pemRepresentation: pem) { return .p384(key) }
        if let key = try? P521.Signing.PublicKey(pemRepresentation: pem) { return .p521(key) }
        if let key = ed25519PublicKey(pem: pem) { return .ed25519(key) }
        do {
            return .rsa(try _RSA.Signing.PublicKey(pemRepresentation: pem))
        } catch {
            throw CryptoFailure("not an RSA (2048 bits or more), EC P-256/P-384/P-521 or Ed25519 public key in PEM form")
        }
    }

    /// The DER prefix of every Ed25519 SubjectPublicKeyInfo (RFC 8410 §4):
    /// SEQUENCE(42) { SEQUENCE(5) { OID 1.3.101.112 }, BIT STRING(33) 0x00 },
    /// then the 32-byte key. swift-crypto has no PEM form for Curve25519 keys,
    /// and the structure has no variable part, so a prefix match is exact.
    private static let ed25519SPKIPrefix: [UInt8] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]

    static func ed25519PublicKey(pem: String) -> Curve25519.Signing.PublicKey? {
        let lines = pem.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
        guard let begin = lines.firstIndex(of: "-----BEGIN PUBLIC KEY-----"),
              let end = lines.firstIndex(of: "-----END PUBLIC KEY-----"), begin < end,
              let der = Data(base64Encoded: lines[(begin + 1)..<end].joined()),
              der.count == ed25519SPKIPrefix.count + 32, der.starts(with: ed25519SPKIPrefix) else { return nil }
        return try? Curve25519.Signing.PublicKey(rawRepresentation: der.suffix(32))
    }

    /// Parses a JWK's public part (RFC 7517/7518, RFC 8037), each field base64url:
    /// RSA `n`/`e`, EC P-256/P-384/P-521 `x`/`y`, OKP Ed25519 `x`.
    public static func publicKey(jwk: [String: String]) throws -> PublicKey {
        func field(_ name: String) throws -> Data {
            guard let text = jwk[name], let bytes = base64URLDecode(text) else {
                throw CryptoFailure("JWK field '\(name)' is missing or not base64url")
            }
            return bytes
        }
        switch jwk["kty"] {
        case "RSA":
            do { return .rsa(try _RSA.Signing.PublicKey(n: try field("n"), e: try field("e"))) }
            catch let failure as CryptoFailure { throw failure }
            catch { throw CryptoFailure("JWK is not a usable RSA public key (2048 bits or more)") }
        case "EC":
            let curve = jwk["crv"] ?? ""
            let size: Int
            switch curve {
            case "P-256": size = 32
            case "P-384": size = 48
            case "P-521": size = 66
            default: throw CryptoFailure("JWK curve '\(curve)' is not supported (P-256, P-384 or P-521)")
            }
            let x = try field("x"), y = try field("y")
            guard x.count == size, y.count == size else { throw CryptoFailure("JWK \(curve) coordinates must be \(size) bytes") }
            do {
                switch size {
                case 32: return .p256(try P256.Signing.PublicKey(rawRepresentation: x + y))
                case 48: return .p384(try P384.Signing.PublicKey(rawRepresentation: x + y))
                default: return .p521(try P521.Signing.PublicKey(rawRepresentation: x + y))
                }
            } catch {
                throw CryptoFailure("JWK is not a point on \(curve)")
            }
        case "OKP":
            guard jwk["crv"] == "Ed25519" else { throw CryptoFailure("JWK curve '\(jwk["crv"] ?? "")' is not supported (Ed25519 only)") }
            let x = try field("x")
            guard x.count == 32, let key = try? Curve25519.Signing.PublicKey(rawRepresentation: x) else {
                throw CryptoFailure("JWK Ed25519 key must be 32 bytes")
            }
            return .ed25519(key)
        default:
            throw CryptoFailure("JWK key type '\(jwk["kty"] ?? "")' is not supported (RSA, EC or OKP)")
        }
    }

    /// Checks `signature` over `data`. ECDSA signatures are in the JOSE form
    /// (r || s, 64/96/132 bytes for P-256/P-384/P-521); a wrong key type for
    /// the scheme is a failure, not a match.
    public static func verify(_ scheme: Scheme, key: PublicKey, data: UnsafeRawBufferPointer,
                              signature: UnsafeRawBufferPointer) -> Bool {
        switch (scheme, key) {
        case (.rsaPKCS1SHA256, .rsa(let key)):
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature),
                                        for: SHA256.hash(data: data), padding: .insecurePKCS1v1_5)
        case (.rsaPKCS1SHA384, .rsa(let key)):
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature),
                                        for: SHA384.hash(data: data), padding: .insecurePKCS1v1_5)
        case (.rsaPKCS1SHA512, .rsa(let key)):
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature),
                                        for: SHA512.hash(data: data), padding: .insecurePKCS1v1_5)
        case (.rsaPSSSHA256, .rsa(let key)):
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature),
                                        for: SHA256.hash(data: data), padding: .PSS)
        case (.rsaPSSSHA384, .rsa(let key)):
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature),
                                        for: SHA384.hash(data: data), padding: .PSS)
        case (.rsaPSSSHA512, .rsa(let key)):
            return key.isValidSignature(_RSA.Signing.RSASignature(rawRepresentation: signature),
                                        for: SHA512.hash(data: data), padding: .PSS)
        case (.ecdsaP256SHA256, .p256(let key)):
            guard let sig = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA256.hash(data: data))
        case (.ecdsaP384SHA384, .p384(let key)):
            guard let sig = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA384.hash(data: data))
        case (.ecdsaP521SHA512, .p521(let key)):
            guard let sig = try? P521.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return key.isValidSignature(sig, for: SHA512.hash(data: data))
        case (.ed25519, .ed25519(let key)):
            return key.isValidSignature(signature, for: data)
        default:
            return false
        }
    }

    static func base64URLDecode(_ text: String) -> Data? {
        var s = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while s.hasSuffix("=") { s.removeLast() }
        s += String(repeating: "=", count: (4 - s.count % 4) % 4)
        return Data(base64Encoded: s)
    }

    public struct CryptoFailure: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }
}

/// Parsed public keys by their text (PEM, or the JWK's fields), so a key
/// used on every request is parsed once per Lua state. Bounded: cleared
/// when full (keys come from config and JWKS documents, so the working set
/// is small; the bound only stops a stream of distinct keys growing it).
final class PublicKeyCache {
    private var keys: [String: WeirCrypto.PublicKey] = [:]
    private let capacity = 512

    func key(for text: String, parse: () throws -> WeirCrypto.PublicKey) throws -> WeirCrypto.PublicKey {
        if let key = keys[text] { return key }
        let key = try parse()
        if keys.count >= capacity { keys.removeAll(keepingCapacity: true) }
        keys[text] = key
        return key
    }
}

extension LuaRuntime {
    func makeCryptoNatives() -> NativeList {
        let keyCache = PublicKeyCache()

        func hash(at index: Int32, on L: LuaThread, _ fname: String) -> WeirCrypto.Hash? {
            guard let name = LuaState.string(at: index, on: L) else { return nil }
            return WeirCrypto.Hash(rawValue: name)
        }

        return [
            ("crypto_hmac", { L in
                guard let hash = hash(at: 1, on: L, "weir.crypto.hmac") else {
                    return .error("weir.crypto.hmac: hash must be \"sha256\", \"sha384\" or \"sha512\"")
                }
                guard let key = luaBytes(at: 2, on: L), let data = luaBytes(at: 3, on: L) else {
                    return .error("weir.crypto.hmac: key and data must be strings")
                }
                pushBytes(WeirCrypto.hmac(hash, key: key, data: data), on: L)
                return .values(1)
            }),
            ("crypto_digest", { L in
                guard let hash = hash(at: 1, on: L, "weir.crypto.digest") else {
                    return .error("weir.crypto.digest: hash must be \"sha256\", \"sha384\" or \"sha512\"")
                }
                guard let data = luaBytes(at: 2, on: L) else { return .error("weir.crypto.digest: data must be a string") }
                pushBytes(WeirCrypto.digest(hash, data: data), on: L)
                return .values(1)
            }),
            ("crypto_pbkdf2", { L in
                guard let password = luaBytes(at: 1, on: L), let salt = luaBytes(at: 2, on: L),
                      lua_isinteger(L, 3) != 0, lua_isinteger(L, 4) != 0 else {
                    return .error("weir.crypto.pbkdf2: expected password, salt, iterations, length")
                }
                let iterations = Int(lua_tointegerx(L, 3, nil)), length = Int(lua_tointegerx(L, 4, nil))
                let hash = lua_type(L, 5) <= 0 ? .sha256 : hash(at: 5, on: L, "weir.crypto.pbkdf2")
                guard let hash else { return .error("weir.crypto.pbkdf2: hash must be \"sha256\", \"sha384\" or \"sha512\"") }
                do {
                    let out = try WeirCrypto.pbkdf2(password: password, salt: salt, iterations: iterations,
                                                    length: length, hash: hash)
                    pushBytes(out, on: L)
                    return .values(1)
                } catch {
                    return .error("weir.crypto.pbkdf2: \(error)")
                }
            }),
            ("crypto_verify", { L in
                guard let schemeName = LuaState.string(at: 1, on: L), let scheme = WeirCrypto.Scheme(rawValue: schemeName) else {
                    return .error("weir.crypto.verify: unknown scheme (rsa-pkcs1-sha256|384|512, rsa-pss-sha256|384|512, ecdsa-p256-sha256, ecdsa-p384-sha384, ecdsa-p521-sha512, ed25519)")
                }
                guard let data = luaBytes(at: 3, on: L), let signature = luaBytes(at: 4, on: L) else {
                    return .error("weir.crypto.verify: data and signature must be strings")
                }
                let key: WeirCrypto.PublicKey
                do {
                    switch lua_type(L, 2) {
                    case LUA_TSTRING:
                        let pem = LuaState.string(at: 2, on: L) ?? ""
                        key = try keyCache.key(for: pem) { try WeirCrypto.publicKey(pem: pem) }
                    case LUA_TTABLE:
                        var jwk: [String: String] = [:]
                        for name in ["kty", "crv", "n", "e", "x", "y"] {
                            LuaState.push(name, on: L)
                            lua_rawget(L, 2)
                            if let value = LuaState.string(at: -1, on: L) { jwk[name] = value }
                            weir_pop(L, 1)
                        }
                        let text = ["kty", "crv", "n", "e", "x", "y"].map { jwk[$0] ?? "" }.joined(separator: "\u{0}")
                        key = try keyCache.key(for: text) { try WeirCrypto.publicKey(jwk: jwk) }
                    default:
                        return .error("weir.crypto.verify: public_key must be a PEM string or a JWK table")
                    }
                } catch {
                    lua_pushnil(L)
                    LuaState.push("invalid public key: \(error)", on: L)
                    return .values(2)
                }
                lua_pushboolean(L, WeirCrypto.verify(scheme, key: key, data: data, signature: signature) ? 1 : 0)
                return .values(1)
            }),
        ]
    }
}
