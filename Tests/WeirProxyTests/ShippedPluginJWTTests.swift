// plugins/jwt through a running proxy with a real upstream; tokens signed by
// the openssl CLI (RS256/ES256/HMAC); keys from consumer credentials or from
// a JWK Set served by a real HTTP server on loopback.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import WeirCore
import WeirProxy
import WeirTestSupport
import XCTest

/// A JWK Set endpoint: serves `body` at any path and counts the requests.
final class JWKSServer: @unchecked Sendable {
    private let state = NIOLockedValueBox<(body: String, hits: Int)>(("{\"keys\":[]}", 0))
    private let accepted = NIOLockedValueBox(0)
    private var channel: Channel!
    private let scheme: String
    var port: Int { channel.localAddress!.port! }
    var url: String { "\(scheme)://127.0.0.1:\(port)/jwks" }
    var hits: Int { state.withLockedValue { $0.hits } }
    /// TCP connections accepted (keep-alive reuse shows as fewer than hits).
    var connections: Int { accepted.withLockedValue { $0 } }

    /// `tls`: serve https with this certificate and key (PEM files).
    init(group: EventLoopGroup, tls: (cert: String, key: String)? = nil) throws {
        let state = self.state, accepted = self.accepted
        scheme = tls == nil ? "http" : "https"
        let context = try tls.map { tls in
            try NIOSSLContext(configuration: TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(tls.cert).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: tls.key, format: .pem))))
        }
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                do {
                    accepted.withLockedValue { $0 += 1 }
                    if let context { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context)) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler(state: state))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch { return channel.eventLoop.makeFailedFuture(error) }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    func serve(keys: [[String: String]]) throws {
        let data = try JSONSerialization.data(withJSONObject: ["keys": keys], options: [.sortedKeys])
        let body = String(decoding: data, as: UTF8.self)
        state.withLockedValue { $0.body = body }
    }

    func stop() { try? channel.close().wait() }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let state: NIOLockedValueBox<(body: String, hits: Int)>
        init(state: NIOLockedValueBox<(body: String, hits: Int)>) { self.state = state }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            guard case .end = unwrapInboundIn(data) else { return }
            let body = state.withLockedValue { s -> String in s.hits += 1; return s.body }
            var buffer = context.channel.allocator.buffer(capacity: body.utf8.count)
            buffer.writeString(body)
            let headers = HTTPHeaders([("content-type", "application/json"), ("content-length", "\(buffer.readableBytes)")])
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}

final class ShippedPluginJWTTests: XCTestCase {
    static let keys = Result { try OpenSSLSigner() }
    var group: MultiThreadedEventLoopGroup!
    var upstream: TestUpstream!
    var keys: OpenSSLSigner!

    override func setUpWithError() throws {
        keys = try Self.keys.get()
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try TestUpstream(group: group)
    }

    override func tearDownWithError() throws {
        upstream.stop()
        try group.syncShutdownGracefully()
    }

    var now: Int { Int(Date().timeIntervalSince1970) }

    private func indented(_ pem: String) -> String {
        pem.split(separator: "\n").map { "              " + $0 }.joined(separator: "\n")
    }

    private func yaml(plugin: String) -> String {
        """
        listeners:
          - { name: web, listen: 127.0.0.1:0 }
        upstreams:
          - { name: backend, targets: [{ address: UPSTREAM }] }
        routes:
          - name: all
            match: { paths: [/] }
            upstream: backend
            plugins:
              - \(plugin)
        access_log: off
        consumers:
          - name: alice
            credentials:
              jwt:
                - { key: alice-hs256, algorithm: HS256, secret: alice-secret }
                - { key: alice-hs384, algorithm: HS384, secret: alice-384 }
                - { key: alice-hs512, algorithm: HS512, secret: alice-512 }
                - { key: alice-b64, secret: "c2VjcmV0LWJ5dGVz" }
          - name: bob
            credentials:
              jwt:
                - key: bob-rs
                  algorithm: RS256
                  rsa_public_key: |
        \(indented(keys.rsaPublicPEM))
                - key: bob-es
                  algorithm: ES256
                  public_key: |
        \(indented(keys.ecPublicPEM))
        """
    }

    private func hs(_ claims: [String: Any], key: String, secret: String, bits: Int = 256, header: [String: Any] = [:]) throws -> String {
        var claims = claims
        claims["iss"] = claims["iss"] ?? key
        return try OpenSSLSigner.jwt(header: ["alg": "HS\(bits)", "typ": "JWT"].merging(header) { $1 }, claims: claims) {
            try self.keys.hmac($0, key: secret, bits: bits)
        }
    }

    private func rs(_ claims: [String: Any], header: [String: Any] = [:]) throws -> String {
        try OpenSSLSigner.jwt(header: ["alg": "RS256"].merging(header) { $1 }, claims: claims) { try self.keys.signRSA($0) }
    }

    private func es(_ claims: [String: Any], header: [String: Any] = [:]) throws -> String {
        try OpenSSLSigner.jwt(header: ["alg": "ES256"].merging(header) { $1 }, claims: claims) { try self.keys.signES256($0) }
    }

    private func bearer(_ token: String) -> (String, String) { ("Authorization", "Bearer " + token) }

    func testEachAlgorithmWithCredentialKeysIdentifiesTheConsumer() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: jwt"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let exp = now + 3600
        let tokens: [(String, String, String)] = [
            ("/hs256", try hs(["exp": exp], key: "alice-hs256", secret: "alice-secret"), "alice"),
            ("/hs384", try hs(["exp": exp], key: "alice-hs384", secret: "alice-384", bits: 384), "alice"),
            ("/hs512", try hs(["exp": exp], key: "alice-hs512", secret: "alice-512", bits: 512), "alice"),
            ("/rs256", try rs(["iss": "bob-rs", "exp": exp]), "bob"),
            ("/es256", try es(["iss": "bob-es", "exp": exp]), "bob"),
        ]
        for (path, token, consumer) in tokens {
            let response = try client.request("GET", path, headers: [bearer(token)])
            XCTAssertEqual(response.status, 200, "\(path): \(response.bodyText)")
            let seen = try XCTUnwrap(upstream.requests.first { $0.uri == path })
            XCTAssertEqual(seen.header("x-consumer-name"), consumer, path)
            XCTAssertNil(seen.header("authorization"), "hide_credentials defaults to true")
        }
        // The token in the default query argument `jwt` is removed from the forwarded query.
        let viaQuery = try client.request("GET", "/q?a=1&jwt=" + (try hs([:], key: "alice-hs256", secret: "alice-secret")))
        XCTAssertEqual(viaQuery.status, 200, viaQuery.bodyText)
        XCTAssertEqual(upstream.requests.first { $0.uri.hasPrefix("/q") }?.uri, "/q?a=1")
    }

    func testCookiesBase64SecretsAndKeptCredentials() throws {
        let config = "{ name: jwt, config: { cookie_names: [session], uri_param_names: [], secret_is_base64: true, hide_credentials: false } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        // secret_is_base64: the credential secret "c2VjcmV0LWJ5dGVz" is the key "secret-bytes".
        let token = try hs([:], key: "alice-b64", secret: "secret-bytes")
        let viaCookie = try client.request("GET", "/c", headers: [("Cookie", "theme=dark; session=\(token)")])
        XCTAssertEqual(viaCookie.status, 200, viaCookie.bodyText)
        XCTAssertEqual(upstream.requests.first { $0.uri == "/c" }?.header("cookie"), "theme=dark; session=\(token)")
        XCTAssertEqual(try client.request("GET", "/q?jwt=\(token)").status, 401, "uri_param_names is empty")
        // With secret_is_base64 an HS256 secret used as given no longer verifies.
        let plain = try hs([:], key: "alice-hs256", secret: "alice-secret")
        XCTAssertEqual(try client.request("GET", "/plain", headers: [bearer(plain)]).status, 401)
    }

    func testExpiredNotYetValidBadSignatureAndMissingTokensAre401() throws {
        let config = "{ name: jwt, config: { claims_to_verify: [exp], clock_skew: 60, maximum_expiration: 86400 } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        func expect(_ path: String, _ token: String?, _ status: Int, _ message: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let response = try client.request("GET", path, headers: token.map { [bearer($0)] } ?? [])
            XCTAssertEqual(response.status, status, "\(path): \(response.bodyText)", file: file, line: line)
            if !message.isEmpty { XCTAssertTrue(response.bodyText.contains(message), "\(path): \(response.bodyText)", file: file, line: line) }
            if status == 401 { XCTAssertEqual(response.header("www-authenticate"), "Bearer realm=\"weir\"", file: file, line: line) }
        }
        let key = "alice-hs256", secret = "alice-secret"
        try expect("/none", nil, 401, "Unauthorized")
        try expect("/expired", try hs(["exp": now - 120], key: key, secret: secret), 401, "token expired")
        try expect("/skewed", try hs(["exp": now - 10], key: key, secret: secret), 200, "")
        try expect("/noexp", try hs([:], key: key, secret: secret), 401, "token has no 'exp' claim")
        try expect("/tooLong", try hs(["exp": now + 90000], key: key, secret: secret), 401, "maximum allowed expiration")
        try expect("/nbf", try hs(["exp": now + 600, "nbf": now + 300], key: key, secret: secret), 401, "token not valid yet")
        try expect("/nbfSkew", try hs(["exp": now + 600, "nbf": now + 30], key: key, secret: secret), 200, "")
        try expect("/wrongSecret", try hs(["exp": now + 600], key: key, secret: "guess"), 401, "Invalid signature")
        // A payload changed after signing.
        let good = try rs(["iss": "bob-rs", "exp": now + 600])
        let parts = good.split(separator: ".").map(String.init)
        let forged = OpenSSLSigner.base64URL(Array("{\"exp\":\(now + 600),\"iss\":\"bob-rs\",\"admin\":true}".utf8))
        try expect("/tampered", parts[0] + "." + forged + "." + parts[2], 401, "Invalid signature")
        try expect("/esBad", try es(["iss": "bob-es", "exp": now + 600]).dropLast(4) + "AAAA", 401, "Invalid signature")
        try expect("/unknownIss", try hs(["exp": now + 600, "iss": "mallory"], key: key, secret: secret), 401, "No credentials found for given 'iss'")
        try expect("/garbage", "not.a.jwt!", 401, "Bad token")
        let two = try client.request("GET", "/two?jwt=" + (try hs(["exp": now + 600], key: key, secret: secret)),
                                     headers: [bearer(try hs(["exp": now + 601], key: key, secret: secret))])
        XCTAssertEqual(two.status, 401)
        XCTAssertTrue(two.bodyText.contains("Multiple tokens provided"), two.bodyText)
        let reached = Set(upstream.requests.map(\.uri))
        XCTAssertEqual(reached, ["/skewed", "/nbfSkew"])
    }

    func testAlgNoneAndAlgorithmConfusionAreRefused() throws {
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: "name: jwt"), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        // alg none, with and without a signature part.
        let noneToken = try OpenSSLSigner.jwt(header: ["alg": "none"], claims: ["iss": "bob-rs"]) { _ in [] }
        XCTAssertEqual(try client.request("GET", "/none", headers: [bearer(noneToken)]).status, 401)
        let noneLower = try OpenSSLSigner.jwt(header: ["alg": "None"], claims: ["iss": "alice-hs256"]) { _ in [] }
        XCTAssertEqual(try client.request("GET", "/none2", headers: [bearer(noneLower)]).status, 401)
        // HS256 signed with bob's RSA public key text as the HMAC secret: the classic confusion.
        let confused = try hs([:], key: "bob-rs", secret: keys.rsaPublicPEM)
        let response = try client.request("GET", "/confused", headers: [bearer(confused)])
        XCTAssertEqual(response.status, 401)
        XCTAssertTrue(response.bodyText.contains("Invalid algorithm"), response.bodyText)
        // An RS256 token for an HS256 credential, and an algorithm the route does not allow.
        XCTAssertEqual(try client.request("GET", "/rsForHs", headers: [bearer(try rs(["iss": "alice-hs256"]))]).status, 401)
        let restricted = try startShippedPluginProxy(yaml: yaml(plugin: "{ name: jwt, config: { allowed_algorithms: [RS256] } }"),
                                                     upstream: upstream)
        defer { restricted.stop() }
        let r = try restricted.connect().request("GET", "/hsNotAllowed", headers: [bearer(try hs([:], key: "alice-hs256", secret: "alice-secret"))])
        XCTAssertEqual(r.status, 401)
        XCTAssertTrue(r.bodyText.contains("Invalid algorithm"), r.bodyText)
        XCTAssertTrue(upstream.requests.isEmpty)
    }

    /// A second key set: tokens it signs are "right algorithm, wrong key".
    static let otherKeys = Result { try OpenSSLSigner() }

    private func signed(_ alg: String, _ claims: [String: Any], header: [String: Any] = [:], by signer: OpenSSLSigner? = nil) throws -> String {
        let keys = signer ?? self.keys!
        return try OpenSSLSigner.jwt(header: ["alg": alg].merging(header) { $1 }, claims: claims) { input in
            switch alg {
            case "RS256", "RS384", "RS512": return try keys.signRSA(input, bits: Int(alg.dropFirst(2))!)
            case "PS256", "PS384", "PS512": return try keys.signRSAPSS(input, bits: Int(alg.dropFirst(2))!)
            case "ES256": return try keys.signECDSA(input, curve: .p256)
            case "ES384": return try keys.signECDSA(input, curve: .p384)
            case "ES512": return try keys.signECDSA(input, curve: .p521)
            default: return try keys.signEd25519(input)   // EdDSA
            }
        }
    }

    /// RS384/512, PS256/384/512, ES384/512 and EdDSA with credential keys
    /// (PEM) and with a JWK Set (RSA, EC P-384/P-521, OKP Ed25519): each
    /// identifies the consumer; a token signed by another key of the right
    /// type fails, and a token whose alg does not fit the key (PKCS#1 for a
    /// PSS credential, ES384 for an Ed25519 JWK, ES512 for a P-384 JWK,
    /// HS256 with the Ed25519 PEM as secret) is refused.
    func testPSSECDSAP384P521AndEdDSAThroughCredentialsAndJWKS() throws {
        let other = try Self.otherKeys.get()
        let credentials = [("RS384", "rsa"), ("RS512", "rsa"), ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
                           ("ES384", "p384"), ("ES512", "p521"), ("EdDSA", "ed25519")]
        func pem(_ kind: String) -> String {
            switch kind {
            case "rsa": return keys.rsaPublicPEM
            case "p384": return keys.ecPublicPEM(.p384)
            case "p521": return keys.ecPublicPEM(.p521)
            default: return keys.ed25519PublicPEM
            }
        }
        let entries = credentials.map { alg, kind in
            "        - key: carol-\(alg.lowercased())\n          algorithm: \(alg)\n          public_key: |\n" + indented(pem(kind))
        }.joined(separator: "\n")
        let yaml = self.yaml(plugin: "name: jwt") + "\n  - name: carol\n    credentials:\n      jwt:\n" + entries
        let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        func expect(_ path: String, _ token: String, _ status: Int, _ message: String = "", file: StaticString = #filePath, line: UInt = #line) throws {
            let response = try client.request("GET", path, headers: [bearer(token)])
            XCTAssertEqual(response.status, status, "\(path): \(response.bodyText)", file: file, line: line)
            if !message.isEmpty { XCTAssertTrue(response.bodyText.contains(message), "\(path): \(response.bodyText)", file: file, line: line) }
        }
        let exp = now + 3600
        for (alg, _) in credentials {
            let path = "/cred-" + alg
            try expect(path, try signed(alg, ["iss": "carol-\(alg.lowercased())", "exp": exp]), 200)
            XCTAssertEqual(upstream.requests.first { $0.uri == path }?.header("x-consumer-name"), "carol", path)
            // The same algorithm signed by another key.
            try expect("/wrong-key-" + alg, try signed(alg, ["iss": "carol-\(alg.lowercased())"], by: other), 401, "Invalid signature")
        }
        // The credential fixes the algorithm: PKCS#1 v1.5 for a PSS key, an ES384 token for the EdDSA key.
        try expect("/rs-for-ps", try signed("RS256", ["iss": "carol-ps256"]), 401, "Invalid algorithm")
        try expect("/es-for-ed", try signed("ES384", ["iss": "carol-eddsa"]), 401, "Invalid algorithm")
        try expect("/hs-ed-pem", try hs([:], key: "carol-eddsa", secret: keys.ed25519PublicPEM), 401, "Invalid algorithm")

        let jwks = try JWKSServer(group: group)
        defer { jwks.stop() }
        try jwks.serve(keys: [try keys.rsaJWK(kid: "rsa"), try keys.ecJWK(kid: "p384", curve: .p384),
                              try keys.ecJWK(kid: "p521", curve: .p521, alg: "ES512"), try keys.ed25519JWK(kid: "ed")])
        let config = "{ name: jwt, config: { jwks_uri: \"\(jwks.url)\", consumer_claim_name: sub } }"
        let jwksProxy = try startShippedPluginProxy(yaml: self.yaml(plugin: config), upstream: upstream, loops: 1)
        defer { jwksProxy.stop() }
        let jwksClient = try jwksProxy.connect()
        func expectJWKS(_ path: String, _ token: String, _ status: Int, _ message: String = "", file: StaticString = #filePath, line: UInt = #line) throws {
            let response = try jwksClient.request("GET", path, headers: [bearer(token)])
            XCTAssertEqual(response.status, status, "\(path): \(response.bodyText)", file: file, line: line)
            if !message.isEmpty { XCTAssertTrue(response.bodyText.contains(message), "\(path): \(response.bodyText)", file: file, line: line) }
        }
        for (alg, kid) in [("PS256", "rsa"), ("PS512", "rsa"), ("RS384", "rsa"), ("ES384", "p384"), ("ES512", "p521"), ("EdDSA", "ed")] {
            try expectJWKS("/jwks-" + alg, try signed(alg, ["sub": "alice", "exp": exp], header: ["kid": kid]), 200)
        }
        // Without kid the set's keys of the right type are tried.
        try expectJWKS("/jwks-ed-nokid", try signed("EdDSA", ["sub": "alice"]), 200)
        try expectJWKS("/jwks-ed-other", try signed("EdDSA", ["sub": "alice"], header: ["kid": "ed"], by: other), 401, "Invalid signature")
        // alg against the kid's key: wrong kty, wrong curve, wrong alg, HMAC.
        try expectJWKS("/es384-okp", try signed("ES384", ["sub": "alice"], header: ["kid": "ed"]), 401, "Invalid algorithm")
        try expectJWKS("/eddsa-ec", try signed("EdDSA", ["sub": "alice"], header: ["kid": "p384"]), 401, "Invalid algorithm")
        try expectJWKS("/es512-p384", try signed("ES512", ["sub": "alice"], header: ["kid": "p384"]), 401, "Invalid algorithm")
        try expectJWKS("/es384-p521", try signed("ES384", ["sub": "alice"], header: ["kid": "p521"]), 401, "Invalid algorithm")
        try expectJWKS("/eddsa-rsa", try signed("EdDSA", ["sub": "alice"], header: ["kid": "rsa"]), 401, "Invalid algorithm")
        try expectJWKS("/hs-ed", try hs(["sub": "alice"], key: "ed", secret: "x", header: ["kid": "ed"]), 401, "Invalid algorithm")
    }

    func testIssuerAndAudienceChecksAndAnonymous() throws {
        let config = "{ name: jwt, config: { issuers: [bob-rs], audiences: [orders, billing], anonymous: guest } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config), upstream: upstream)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/aud", headers: [bearer(try rs(["iss": "bob-rs", "aud": "orders"]))]).status, 200)
        XCTAssertEqual(try client.request("GET", "/audList", headers: [bearer(try rs(["iss": "bob-rs", "aud": ["x", "billing"]]))]).status, 200)
        for (path, token) in [("/wrongAud", try rs(["iss": "bob-rs", "aud": "payroll"])),
                              ("/noAud", try rs(["iss": "bob-rs"])),
                              ("/wrongIss", try hs(["aud": "orders"], key: "alice-hs256", secret: "alice-secret"))] {
            XCTAssertEqual(try client.request("GET", path, headers: [bearer(token)]).status, 200, "anonymous lets it through")
            let seen = try XCTUnwrap(upstream.requests.first { $0.uri == path })
            XCTAssertEqual(seen.header("x-consumer-name"), "guest", path)
            XCTAssertEqual(seen.header("x-anonymous-consumer"), "true", path)
        }
        XCTAssertEqual(upstream.requests.first { $0.uri == "/aud" }?.header("x-consumer-name"), "bob")
        XCTAssertNil(upstream.requests.first { $0.uri == "/aud" }?.header("x-anonymous-consumer"))
    }

    func testJWKSKeysRotationRateLimitAndConsumerClaim() throws {
        let jwks = try JWKSServer(group: group)
        defer { jwks.stop() }
        try jwks.serve(keys: [try keys.rsaJWK(kid: "k1", alg: "RS256")])
        let config = "{ name: jwt, config: { jwks_uri: \"\(jwks.url)\", jwks_min_refresh_interval: 0, consumer_claim_name: sub } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config), upstream: upstream, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()

        let ok = try client.request("GET", "/k1", headers: [bearer(try rs(["sub": "alice", "exp": now + 600], header: ["kid": "k1"]))])
        XCTAssertEqual(ok.status, 200, ok.bodyText)
        XCTAssertEqual(upstream.requests.first { $0.uri == "/k1" }?.header("x-consumer-name"), "alice")
        XCTAssertEqual(jwks.hits, 1)
        // Cached: no fetch for a known kid; a token without kid tries the set's keys.
        XCTAssertEqual(try client.request("GET", "/nokid", headers: [bearer(try rs(["sub": "bob"]))]).status, 200)
        XCTAssertEqual(jwks.hits, 1)
        // Not a configured consumer / no consumer claim.
        XCTAssertEqual(try client.request("GET", "/carol", headers: [bearer(try rs(["sub": "carol"], header: ["kid": "k1"]))]).status, 401)
        XCTAssertEqual(try client.request("GET", "/nosub", headers: [bearer(try rs([:], header: ["kid": "k1"]))]).status, 401)
        // HMAC tokens are never checked against a JWK Set; a JWK with alg RS256 is not an ES256 key.
        let hsToken = try hs(["sub": "alice"], key: "k1", secret: "x", header: ["kid": "k1"])
        XCTAssertTrue(try client.request("GET", "/hs", headers: [bearer(hsToken)]).bodyText.contains("Invalid algorithm"))

        // Rotation: a token with a new kid makes the plugin fetch the set again.
        try jwks.serve(keys: [try keys.rsaJWK(kid: "k1", alg: "RS256"), try keys.ecJWK(kid: "k2")])
        let rotated = try client.request("GET", "/k2", headers: [bearer(try es(["sub": "bob"], header: ["kid": "k2"]))])
        XCTAssertEqual(rotated.status, 200, rotated.bodyText)
        XCTAssertEqual(upstream.requests.first { $0.uri == "/k2" }?.header("x-consumer-name"), "bob")
        XCTAssertEqual(jwks.hits, 2)
        // An ES256 token whose kid names the RSA key.
        XCTAssertEqual(try client.request("GET", "/mismatch", headers: [bearer(try es(["sub": "bob"], header: ["kid": "k1"]))]).status, 401)
        XCTAssertEqual(jwks.hits, 2)
    }

    /// jwks_uri over https: the server's certificate is verified against
    /// jwks_ca_file (a test CA); a certificate from another CA is refused
    /// (no key set -> 503) unless jwks_ssl_verify is false. The rotation
    /// refetch reuses the first fetch's keep-alive connection.
    func testJWKSOverHTTPSVerifiesTheCertificateAndKeepsTheConnection() throws {
        let pki = TestPKI.shared
        let jwks = try JWKSServer(group: group, tls: (pki.cert("localhost"), pki.key("localhost")))
        defer { jwks.stop() }
        try jwks.serve(keys: [try keys.rsaJWK(kid: "k1", alg: "RS256")])
        XCTAssertTrue(jwks.url.hasPrefix("https://"))
        func config(_ extra: String) -> String {
            "{ name: jwt, config: { jwks_uri: \"\(jwks.url)\", jwks_min_refresh_interval: 0\(extra) } }"
        }
        do {
            let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config(", jwks_ca_file: \"\(pki.cert("ca"))\"")),
                                                    upstream: upstream, loops: 1)
            defer { proxy.stop() }
            let client = try proxy.connect()
            let ok = try client.request("GET", "/k1", headers: [bearer(try rs(["sub": "alice"], header: ["kid": "k1"]))])
            XCTAssertEqual(ok.status, 200, ok.bodyText)
            try jwks.serve(keys: [try keys.rsaJWK(kid: "k1", alg: "RS256"), try keys.ecJWK(kid: "k2")])
            let rotated = try client.request("GET", "/k2", headers: [bearer(try es(["sub": "bob"], header: ["kid": "k2"]))])
            XCTAssertEqual(rotated.status, 200, rotated.bodyText)
            XCTAssertEqual(jwks.hits, 2)
            XCTAssertEqual(jwks.connections, 1, "the second fetch reused the keep-alive TLS connection")
        }
        // The system's CAs do not know the test CA; a CA that did not sign the certificate neither.
        for extra in ["", ", jwks_ca_file: \"\(pki.cert("other-ca"))\""] {
            let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config(extra)), upstream: upstream, loops: 1)
            defer { proxy.stop() }
            let refused = try proxy.connect().request("GET", "/untrusted", headers: [bearer(try rs(["sub": "alice"], header: ["kid": "k1"]))])
            XCTAssertEqual(refused.status, 503, "no key set could be fetched (\(extra)): \(refused.bodyText)")
        }
        XCTAssertEqual(jwks.hits, 2, "no request got past a failed handshake")
        let unverified = try startShippedPluginProxy(yaml: yaml(plugin: config(", jwks_ssl_verify: false")), upstream: upstream, loops: 1)
        defer { unverified.stop() }
        let ok = try unverified.connect().request("GET", "/unverified", headers: [bearer(try rs(["sub": "alice"], header: ["kid": "k1"]))])
        XCTAssertEqual(ok.status, 200, ok.bodyText)
    }

    func testUnknownKidRefetchIsRateLimitedAndAFailedRefreshKeepsTheKeys() throws {
        let jwks = try JWKSServer(group: group)
        try jwks.serve(keys: [try keys.rsaJWK(kid: "k1")])
        let config = "{ name: jwt, config: { jwks_uri: \"\(jwks.url)\", jwks_min_refresh_interval: 3600, jwks_timeout: 0.5 } }"
        let proxy = try startShippedPluginProxy(yaml: yaml(plugin: config), upstream: upstream, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/first", headers: [bearer(try rs([:], header: ["kid": "k1"]))]).status, 200)
        XCTAssertEqual(jwks.hits, 1)
        for i in 0..<3 {
            let unknown = try client.request("GET", "/unknown\(i)", headers: [bearer(try rs([:], header: ["kid": "k9"]))])
            XCTAssertEqual(unknown.status, 401)
            XCTAssertTrue(unknown.bodyText.contains("No key found for kid 'k9'"), unknown.bodyText)
        }
        XCTAssertEqual(jwks.hits, 1, "one fetch per jwks_min_refresh_interval, whatever kids clients send")
        // No consumer claim configured: verified, but no consumer is set.
        let first = try XCTUnwrap(upstream.requests.first { $0.uri == "/first" })
        XCTAssertNil(first.header("x-consumer-name"))

        // The JWKS server goes away: the keys fetched before keep working.
        jwks.stop()
        XCTAssertEqual(try client.request("GET", "/afterStop", headers: [bearer(try rs([:], header: ["kid": "k1"]))]).status, 200)
    }

    func testUnreachableJWKSWithNoKeysIs503OrTheConfigured401() throws {
        let jwks = try JWKSServer(group: group)
        let deadURL = jwks.url
        jwks.stop()   // nothing listens on its port any more
        let token = try rs([:], header: ["kid": "k1"])
        let proxy = try startShippedPluginProxy(
            yaml: yaml(plugin: "{ name: jwt, config: { jwks_uri: \"\(deadURL)\", jwks_timeout: 0.5 } }"), upstream: upstream, loops: 1)
        defer { proxy.stop() }
        let response = try proxy.connect().request("GET", "/down", headers: [bearer(token)])
        XCTAssertEqual(response.status, 503)
        XCTAssertTrue(response.bodyText.contains("JWKS unavailable"), response.bodyText)

        let strict = try startShippedPluginProxy(
            yaml: yaml(plugin: "{ name: jwt, config: { jwks_uri: \"\(deadURL)\", jwks_timeout: 0.5, jwks_unavailable_status: 401 } }"),
            upstream: upstream, loops: 1)
        defer { strict.stop() }
        XCTAssertEqual(try strict.connect().request("GET", "/down401", headers: [bearer(token)]).status, 401)
        XCTAssertTrue(upstream.requests.isEmpty)
    }

    func testSchemaBadValuesAreRefusedWithTheirPath() throws {
        for (config, path) in [("{ algorithms: [none] }", "config.algorithms"),
                               ("{ allowed_algorithms: [none] }", "config.allowed_algorithms[0]"),
                               ("{ claims_to_verify: [iat] }", "config.claims_to_verify[0]"),
                               ("{ jwks_unavailable_status: 500 }", "config.jwks_unavailable_status"),
                               ("{ clock_skew: -1 }", "config.clock_skew")] {
            XCTAssertThrowsError(try startShippedPluginProxy(yaml: yaml(plugin: "{ name: jwt, config: \(config) }"), upstream: upstream)) { error in
                XCTAssertTrue("\(error)".contains("routes[0].plugins[0].\(path)"), "\(config): \(error)")
            }
        }
    }
}

final class ShippedPluginJWTCacheTests: XCTestCase {
    func testACachedTokenStillExpiresOnTimeAndTheCacheCanBeTurnedOff() throws {
        let keys = try ShippedPluginJWTTests.keys.get()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let upstream = try TestUpstream(group: group)
        defer { upstream.stop() }
        let folder = try PluginFolder()
        try writeTestClockPlugin(into: folder)
        for ttl in [10, 0] {
            let yaml = """
            listeners:
              - { name: web, listen: 127.0.0.1:0 }
            upstreams:
              - { name: backend, targets: [{ address: UPSTREAM }] }
            routes:
              - name: all
                match: { paths: [/] }
                upstream: backend
                plugins: [test-clock, { name: jwt, config: { cache_ttl: \(ttl) } }]
            access_log: off
            consumers:
              - name: alice
                credentials: { jwt: [{ key: alice-hs256, secret: alice-secret }] }
            """
            let proxy = try startShippedPluginProxy(yaml: yaml, upstream: upstream, loops: 1, extraPluginPaths: [folder.pluginsDir])
            defer { proxy.stop() }
            let client = try proxy.connect()
            let exp = 2_000_000_000
            let token = try OpenSSLSigner.jwt(header: ["alg": "HS256"], claims: ["iss": "alice-hs256", "exp": exp]) {
                try keys.hmac($0, key: "alice-secret")
            }
            let auth = ("Authorization", "Bearer " + token)
            // Verified (and, with a ttl, cached) while the test clock is before exp ...
            XCTAssertEqual(try client.request("GET", "/a", headers: [auth, ("x-test-clock", "\(exp - 100)")]).status, 200)
            XCTAssertEqual(try client.request("GET", "/b", headers: [auth, ("x-test-clock", "\(exp - 50)")]).status, 200)
            // ... and refused once the clock passes exp, from the cache too.
            let expired = try client.request("GET", "/c", headers: [auth, ("x-test-clock", "\(exp + 1)")])
            XCTAssertEqual(expired.status, 401, "cache_ttl \(ttl)")
            XCTAssertTrue(expired.bodyText.contains("token expired"), expired.bodyText)
            // A different signature on the same claims is a cache miss and fails.
            var parts = token.split(separator: ".").map(String.init)
            parts[2] = (parts[2].hasPrefix("A") ? "B" : "A") + parts[2].dropFirst()   // the top bits of the signature
            let forged = parts.joined(separator: ".")
            XCTAssertEqual(try client.request("GET", "/d", headers: [("Authorization", "Bearer " + forged), ("x-test-clock", "\(exp - 10)")]).status, 401)
        }
    }
}
