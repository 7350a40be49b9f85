import Foundation
import WeirCore
import WeirTestSupport
import XCTest
@testable import WeirLua

/// weir.crypto's Swift half (HMAC-SHA384/512, digests, PBKDF2, RSA/ECDSA
/// verification) against independent implementations (Python's hashlib
/// vectors, the openssl CLI), and password hashing at consumer load.
final class CryptoSDKTests: XCTestCase {
    /// Runs `body` as the request phase of a one-plugin chain; returns the exit body.
    func requestBody(_ body: String) throws -> (String?, TestRequest, PhaseResult) {
        let harness = Harness()
        harness.folder.add("probe", handler: """
        local weir = require "weir"
        return { PRIORITY = 1, VERSION = "1", request = function(self, conf, ctx)
        \(body)
        end }
        """)
        try harness.load(["probe"])
        let req = harness.newRequest()
        let result = try harness.runRequest(try harness.chain("probe"), request: req)[0]
        return (result.exitValue?.bodyString, req, result)
    }

    func testHMACDigestAndPBKDF2MatchReferenceVectors() throws {
        let (body, _, result) = try requestBody("""
        local c = weir.crypto
        local msg = "The quick brown fox jumps over the lazy dog"
        return 200, table.concat({
          c.hex(c.hmac("sha384", "key", msg)), c.hex(c.hmac("sha512", "key", msg)), c.hex(c.hmac("sha256", "key", msg)),
          c.hex(c.digest("sha512", "abc")):sub(1, 32),
          c.hex(c.pbkdf2("passwd", "salt", 1, 32)),
          c.hex(c.pbkdf2("password", "NaCl-salt-16byte", 2000, 32, "sha256")),
        }, "|")
        """)
        // Python: hmac.new(b'key', msg, hashlib.sha384/512), hashlib.pbkdf2_hmac('sha256', ...).
        XCTAssertEqual(body, [
            "d7f4727e2c0b39ae0f1e40cc96f60242d5b7801841cea6fc592c5d3e1ae50700582a96cf35e1e554995fe4e03381c237",
            "b42af09057bac1e2d41708e48a902e09b5ff7f12ab428a4fe86653c73dd248fb82f948a549f7b791a5b41915ee4d1ec3935357e4e2317250d0372afa2ebeeb3a",
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8",
            "ddaf35a193617abacc417349ae204131",
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc",
            "0617c60aabf62de184208da4fd22157dabd1ed7bc7349e3f655c016c04b6c69e",
        ].joined(separator: "|"), "\(result)")
    }

    func testVerifyRSAAndECDSASignaturesMadeByOpenSSL() throws {
        let keys = try OpenSSLSigner()
        let data = Array("header.payload".utf8)
        func b64(_ b: [UInt8]) -> String { Data(b).base64EncodedString() }
        let rsaJWK = try keys.rsaJWK(kid: "r1"), ecJWK = try keys.ecJWK(kid: "e1")
        let (body, _, result) = try requestBody("""
        local c = weir.crypto
        local d = c.base64_decode
        local data = "header.payload"
        local rs256, rs512, es256 = d("\(b64(try keys.signRSA(data)))"), d("\(b64(try keys.signRSA(data, bits: 512)))"), d("\(b64(try keys.signES256(data)))")
        local rsa_pem, ec_pem = [[\(keys.rsaPublicPEM)]], [[\(keys.ecPublicPEM)]]
        local rsa_jwk = { kty = "RSA", n = "\(rsaJWK["n"]!)", e = "AQAB" }
        local ec_jwk = { kty = "EC", crv = "P-256", x = "\(ecJWK["x"]!)", y = "\(ecJWK["y"]!)" }
        local flipped = string.char(rs256:byte(1) ~ 1) .. rs256:sub(2)
        local bad, err = c.verify("rsa-pkcs1-sha256", "not a key", data, rs256)
        local badjwk, err2 = c.verify("ecdsa-p256-sha256", { kty = "EC", crv = "P-192", x = "AA", y = "AA" }, data, es256)
        local ok, argerr = pcall(c.verify, "none", rsa_pem, data, rs256)
        return 200, table.concat({
          tostring(c.verify("rsa-pkcs1-sha256", rsa_pem, data, rs256)),
          tostring(c.verify("rsa-pkcs1-sha256", rsa_jwk, data, rs256)),
          tostring(c.verify("rsa-pkcs1-sha512", rsa_pem, data, rs512)),
          tostring(c.verify("ecdsa-p256-sha256", ec_pem, data, es256)),
          tostring(c.verify("ecdsa-p256-sha256", ec_jwk, data, es256)),
          -- wrong data, flipped bit, wrong hash, wrong key type for the scheme
          tostring(c.verify("rsa-pkcs1-sha256", rsa_pem, data .. "x", rs256)),
          tostring(c.verify("rsa-pkcs1-sha256", rsa_pem, data, flipped)),
          tostring(c.verify("rsa-pkcs1-sha384", rsa_pem, data, rs256)),
          tostring(c.verify("ecdsa-p256-sha256", rsa_pem, data, es256)),
          tostring(c.verify("ecdsa-p256-sha256", ec_pem, data, "short")),
          tostring(bad), tostring(err ~= nil), tostring(badjwk), err2, tostring(ok), argerr,
        }, "|")
        """)
        let parts = (body ?? "").split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        XCTAssertEqual(Array(parts.prefix(10)), ["true", "true", "true", "true", "true", "false", "false", "false", "false", "false"], "\(result)")
        XCTAssertEqual(parts.dropFirst(10).prefix(3), ["nil", "true", "nil"])
        XCTAssertTrue(parts.count > 13 && parts[13].contains("(P-256, P-384 or P-521)"), body ?? "")
        XCTAssertEqual(parts.count > 14 ? parts[14] : "", "false")
        XCTAssertTrue((body ?? "").hasSuffix("|false|bad argument #1 to 'weir.crypto.verify' (rsa-pkcs1-sha256|384|512, rsa-pss-sha256|384|512, ecdsa-p256-sha256, ecdsa-p384-sha384, ecdsa-p521-sha512 or ed25519 expected, got none)"), body ?? "")
    }

    /// RSA-PSS, ECDSA on P-384/P-521 and Ed25519, keys as PEM and as JWK,
    /// signatures from the openssl CLI; a key of another type or curve, or
    /// another padding, never verifies.
    func testVerifyPSSP384P521AndEd25519SignaturesMadeByOpenSSL() throws {
        let keys = try OpenSSLSigner()
        let data = Array("header.payload".utf8)
        func b64(_ b: [UInt8]) -> String { Data(b).base64EncodedString() }
        let p384 = try keys.ecJWK(kid: nil, curve: .p384), p521 = try keys.ecJWK(kid: nil, curve: .p521)
        let ed = try keys.ed25519JWK(kid: nil)
        let (body, _, result) = try requestBody("""
        local c = weir.crypto
        local d = c.base64_decode
        local data = "header.payload"
        local ps256, ps512, rs256 = d("\(b64(try keys.signRSAPSS(data)))"), d("\(b64(try keys.signRSAPSS(data, bits: 512)))"), d("\(b64(try keys.signRSA(data)))")
        local es384, es512 = d("\(b64(try keys.signECDSA(data, curve: .p384)))"), d("\(b64(try keys.signECDSA(data, curve: .p521)))")
        local eddsa = d("\(b64(try keys.signEd25519(data)))")
        local rsa_pem, p384_pem, p521_pem, ed_pem = [[\(keys.rsaPublicPEM)]], [[\(keys.ecPublicPEM(.p384))]], [[\(keys.ecPublicPEM(.p521))]], [[\(keys.ed25519PublicPEM)]]
        local p384_jwk = { kty = "EC", crv = "P-384", x = "\(p384["x"]!)", y = "\(p384["y"]!)" }
        local p521_jwk = { kty = "EC", crv = "P-521", x = "\(p521["x"]!)", y = "\(p521["y"]!)" }
        local ed_jwk = { kty = "OKP", crv = "Ed25519", x = "\(ed["x"]!)" }
        local bad, err = c.verify("ed25519", { kty = "OKP", crv = "Ed448", x = "AA" }, data, eddsa)
        return 200, table.concat({
          tostring(c.verify("rsa-pss-sha256", rsa_pem, data, ps256)),
          tostring(c.verify("rsa-pss-sha512", rsa_pem, data, ps512)),
          tostring(c.verify("ecdsa-p384-sha384", p384_pem, data, es384)),
          tostring(c.verify("ecdsa-p384-sha384", p384_jwk, data, es384)),
          tostring(c.verify("ecdsa-p521-sha512", p521_pem, data, es512)),
          tostring(c.verify("ecdsa-p521-sha512", p521_jwk, data, es512)),
          tostring(c.verify("ed25519", ed_pem, data, eddsa)),
          tostring(c.verify("ed25519", ed_jwk, data, eddsa)),
          -- PKCS#1 v1.5 vs PSS both ways, wrong hash, wrong curve, wrong key type, changed data
          tostring(c.verify("rsa-pss-sha256", rsa_pem, data, rs256)),
          tostring(c.verify("rsa-pkcs1-sha256", rsa_pem, data, ps256)),
          tostring(c.verify("rsa-pss-sha384", rsa_pem, data, ps256)),
          tostring(c.verify("ecdsa-p384-sha384", p521_pem, data, es384)),
          tostring(c.verify("ecdsa-p521-sha512", p384_jwk, data, es512)),
          tostring(c.verify("ed25519", rsa_pem, data, eddsa)),
          tostring(c.verify("rsa-pss-sha256", ed_pem, data, ps256)),
          tostring(c.verify("ed25519", ed_jwk, data .. "x", eddsa)),
          tostring(c.verify("ecdsa-p384-sha384", p384_pem, data .. "x", es384)),
          tostring(bad), err,
        }, "|")
        """)
        let parts = (body ?? "").split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        XCTAssertEqual(Array(parts.prefix(8)), Array(repeating: "true", count: 8), "\(result) \(body ?? "")")
        XCTAssertEqual(Array(parts.dropFirst(8).prefix(9)), Array(repeating: "false", count: 9), body ?? "")
        XCTAssertEqual(parts.count > 17 ? parts[17] : "", "nil", body ?? "")
        XCTAssertTrue(parts.count > 18 && parts[18].contains("Ed25519 only"), body ?? "")
    }

    func testPBKDF2ArgumentChecksRaiseAtThePluginLine() throws {
        let (body, _, _) = try requestBody("""
        local ok1, e1 = pcall(weir.crypto.pbkdf2, "p", "s", 0, 32)
        local ok2, e2 = pcall(weir.crypto.hmac, "md5", "k", "d")
        return 200, e1 .. "|" .. e2
        """)
        XCTAssertTrue(body?.contains("iterations must be 1..10000000") == true, body ?? "")
        XCTAssertTrue(body?.contains("bad argument #1 to 'weir.crypto.hmac'") == true, body ?? "")
    }

    func testCredentialLookupMatchesWholeFieldsAndFirstConsumerWins() {
        var first = ConsumerConfig()
        first.name = "first"
        first.credentials["key-auth"] = .array([.map(["key": .string("k1")]), .map(["key": .string("")])])
        var second = ConsumerConfig()
        second.name = "second"
        second.credentials["key-auth"] = .map(["key": .string("k1")])
        second.credentials["key-aut"] = .map(["hkey": .string("k1")])
        let credentials = ConsumerCredentials(consumers: [first, second])
        XCTAssertEqual(credentials.find(plugin: "key-auth", field: "key", value: "k1")?.consumer, "first")
        XCTAssertEqual(credentials.find(plugin: "key-auth", field: "key", value: "")?.consumer, "first")
        // Same bytes split differently across plugin/field is another credential.
        XCTAssertEqual(credentials.find(plugin: "key-aut", field: "hkey", value: "k1")?.consumer, "second")
        XCTAssertNil(credentials.find(plugin: "key-aut", field: "key", value: "k1"))
        XCTAssertNil(credentials.find(plugin: "key-auth", field: "key", value: "k"))
        XCTAssertNil(credentials.find(plugin: "key-auth", field: "key", value: "k1 "))
    }

    func testPlainPasswordsAreHashedAtLoadAndNeverIndexed() throws {
        var alice = ConsumerConfig()
        alice.name = "alice"
        alice.credentials["basic-auth"] = .array([.map(["username": .string("alice"), "password": .string("open sesame"),
                                                        "iterations": .int(1000)])])
        var bob = ConsumerConfig()
        bob.name = "bob"
        bob.credentials["basic-auth"] = .map(["username": .string("bob"),
                                              "password": .string("pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$pj4T35D2v4tYmC1sTJ1y5tcMADOdtnQGvuHmyYDQh2g")])
        let credentials = ConsumerCredentials(consumers: [alice, bob])
        let match = try XCTUnwrap(credentials.find(plugin: "basic-auth", field: "username", value: "alice"))
        guard case .string(let stored)? = match.credential["password"] else { return XCTFail("no password field") }
        XCTAssertTrue(stored.hasPrefix("pbkdf2-sha256$1000$"), stored)
        XCTAssertFalse(stored.contains("open sesame"))
        XCTAssertNil(match.credential["iterations"])
        let hash = try PasswordHash.parse(stored).get()
        XCTAssertEqual(hash.salt.count, 16)
        XCTAssertEqual(hash.derivedKey, try WeirCrypto.pbkdf2(password: Array("open sesame".utf8), salt: hash.salt,
                                                                 iterations: 1000, length: 32))
        // Secrets are not lookup keys; a pre-hashed password is kept as given.
        XCTAssertNil(credentials.find(plugin: "basic-auth", field: "password", value: "open sesame"))
        XCTAssertNil(credentials.find(plugin: "basic-auth", field: "password", value: stored))
        XCTAssertEqual(credentials.find(plugin: "basic-auth", field: "username", value: "bob")?.credential["password"],
                       .string("pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$pj4T35D2v4tYmC1sTJ1y5tcMADOdtnQGvuHmyYDQh2g"))
        // A rebuild (reload) with the same password keeps the hash (no new PBKDF2 run, same salt);
        // a changed password gets a new one.
        let again = ConsumerCredentials(consumers: [alice, bob])
        XCTAssertEqual(again.find(plugin: "basic-auth", field: "username", value: "alice")?.credential["password"], .string(stored))
        alice.credentials["basic-auth"] = .array([.map(["username": .string("alice"), "password": .string("changed"), "iterations": .int(1000)])])
        let changed = ConsumerCredentials(consumers: [alice, bob])
        XCTAssertNotEqual(changed.find(plugin: "basic-auth", field: "username", value: "alice")?.credential["password"], .string(stored))
        XCTAssertTrue(changed.isConsumer("bob"))
        XCTAssertFalse(changed.isConsumer("carol"))
    }
}
