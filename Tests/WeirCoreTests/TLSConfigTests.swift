// The `tls:` blocks of listeners and upstreams: shape, defaults, and the
// errors (config path + YAML line) for what is wrong. No files are opened
// here (WeirCore); file checks are in WeirProxyTests' TLSConfigFileTests.

@testable import WeirCore
import XCTest

final class TLSConfigTests: XCTestCase {
    private func parse(_ yaml: String) throws -> WeirConfig {
        try ConfigLoader.parse(yaml: yaml, baseDirectory: "/etc/weir")
    }

    private func issues(_ yaml: String) -> [String] {
        do {
            _ = try parse(yaml)
            return []
        } catch let errors as ConfigErrors {
            return errors.issues.map(\.description)
        } catch {
            return ["\(error)"]
        }
    }

    private let upstreams = """
    upstreams:
      - name: b
        targets: [127.0.0.1:9000]
    routes:
      - { name: r, upstream: b }
    """

    func testHTTPSListenerWithEveryKey() throws {
        let config = try parse("""
        listeners:
          - name: web
            listen: 127.0.0.1:8443
            protocol: https
            tls:
              certificates:
                - { cert: certs/api.pem, key: certs/api.key, server_names: ["API.example.com", "*.api.example.com"] }
                - { cert: /abs/default.pem, key: /abs/default.key }
              default_certificate: 1
              min_version: "1.3"
              alpn: [http/1.1]
              client_ca: ca.pem
              client_auth: optional
              handshake_timeout: 3s
        \(upstreams)
        """)
        let tls = try XCTUnwrap(config.listeners[0].tls)
        XCTAssertEqual(tls.certificates[0].cert, "/etc/weir/certs/api.pem", "relative to the config's folder")
        XCTAssertEqual(tls.certificates[0].serverNames, ["api.example.com", "*.api.example.com"])
        XCTAssertEqual(tls.certificates[1].key, "/abs/default.key")
        XCTAssertEqual(tls.defaultCertificate, 1)
        XCTAssertEqual(tls.minVersion, .v1_3)
        XCTAssertEqual(tls.clientCA, "/etc/weir/ca.pem")
        XCTAssertEqual(tls.clientAuth, .optional)
        XCTAssertEqual(tls.handshakeTimeout, .seconds(3))
        XCTAssertEqual(tls.files, ["/etc/weir/certs/api.pem", "/etc/weir/certs/api.key", "/abs/default.pem", "/abs/default.key", "/etc/weir/ca.pem"])
        // /config shows it and it loads back the same.
        let again = try ConfigLoader.parse(yaml: redactedYAML(config))
        XCTAssertEqual(again.listeners[0].tls, tls)
    }

    func testDefaults() throws {
        let config = try parse("""
        listeners:
          - name: web
            listen: 127.0.0.1:8443
            protocol: https
            tls: { certificates: [{ cert: a.pem, key: a.key }] }
        \(upstreams)
        """)
        let tls = try XCTUnwrap(config.listeners[0].tls)
        XCTAssertEqual(tls.minVersion, .v1_2)
        XCTAssertNil(tls.ciphers)
        XCTAssertEqual(tls.alpn, ["http/1.1"])
        XCTAssertNil(tls.clientCA)
        XCTAssertEqual(tls.handshakeTimeout, .seconds(10))
    }

    func testShapeErrorsCarryPathAndLine() {
        let found = issues("""
        listeners:
          - name: web
            listen: 127.0.0.1:8443
            protocol: https
          - name: plain
            listen: 127.0.0.1:8080
            tls: { certificates: [{ cert: a.pem, key: a.key }] }
          - name: bad
            listen: 127.0.0.1:8444
            protocol: https
            tls:
              certificates: []
              min_version: "1.1"
              ciphers: [ECDHE-RSA-AES128-GCM-SHA265, RC4-MD5]
              alpn: [h3]
              client_auth: required
              default_certificate: 3
        \(upstreams)
        """)
        XCTAssertEqual(found, [
            "listeners[0].protocol: https needs a tls block with at least one certificate (line 4)",
            "listeners[1].tls: only applies to protocol https (this listener is http) (line 7)",
            "listeners[2].tls.certificates: at least one certificate is required (line 12)",
            "listeners[2].tls.min_version: unknown TLS version \"1.1\" (expected 1.2 or 1.3) (line 13)",
            "listeners[2].tls.ciphers[0]: unknown TLS 1.2 cipher suite \"ECDHE-RSA-AES128-GCM-SHA265\" (did you mean \"ECDHE-RSA-AES128-GCM-SHA256\"?) (line 14)",
            "listeners[2].tls.ciphers[1]: unknown TLS 1.2 cipher suite \"RC4-MD5\" (expected OpenSSL names such as ECDHE-RSA-AES128-GCM-SHA256) (line 14)",
            "listeners[2].tls.alpn[0]: cannot advertise \"h3\": unknown protocol (supported: h2, http/1.1) (line 15)",
            "listeners[2].tls.client_auth: needs client_ca (the CAs client certificates are verified against) (line 16)",
            "listeners[2].tls.default_certificate: no certificate at index 3 (there are 0) (line 17)",
        ])
    }

    /// TLS + `protocol: http2` is accepted: the HTTP/2 upstream pool offers
    /// ALPN h2 in the handshake (UpstreamHTTP2Tests covers the connection).
    func testHTTP2UpstreamOverTLSIsAccepted() throws {
        let config = try parse("""
        listeners: [{ name: web, listen: 127.0.0.1:8080 }]
        upstreams:
          - name: grpc
            protocol: http2
            targets: [10.0.0.1:443]
            tls: { ca: ca.pem }
        routes: [{ name: r, upstream: grpc }]
        """)
        XCTAssertEqual(config.upstreams[0].upstreamProtocol, .http2)
        XCTAssertEqual(config.upstreams[0].tls?.ca, "/etc/weir/ca.pem")
    }

    func testUpstreamTLS() throws {
        let config = try parse("""
        listeners: [{ name: web, listen: 127.0.0.1:8080 }]
        upstreams:
          - name: secure
            targets: [10.0.0.1:443]
            tls: { ca: ca.pem, sni: Orders.Internal, cert: client.pem, key: client.key }
          - name: plain
            targets: [10.0.0.2:80]
            tls: { enabled: false }
          - name: lax
            targets: [10.0.0.3:443]
            tls: { verify: false }
        routes: [{ name: r, upstream: secure }]
        """)
        let secure = try XCTUnwrap(config.upstreams[0].tls)
        XCTAssertTrue(secure.verify)
        XCTAssertEqual(secure.sni, "orders.internal")
        XCTAssertEqual(secure.ca, "/etc/weir/ca.pem")
        XCTAssertEqual(secure.cert, "/etc/weir/client.pem")
        XCTAssertNil(config.upstreams[1].tls, "enabled: false is plain TCP")
        XCTAssertEqual(config.upstreams[2].tls?.verify, false)
        XCTAssertNil(config.upstreams[2].tls?.ca, "no ca: the system's roots")

        XCTAssertEqual(issues("""
        listeners: [{ name: web, listen: 127.0.0.1:8080 }]
        upstreams:
          - name: secure
            targets: [10.0.0.1:443]
            tls: { cert: client.pem, sni: "*.bad", verfy: true }
        routes: [{ name: r, upstream: secure }]
        """), [
            "upstreams[0].tls.verfy: unknown key (did you mean \"verify\"?) (line 5)",
            "upstreams[0].tls.sni: invalid server name \"*.bad\" (line 5)",
            "upstreams[0].tls.cert: cert and key go together (the client certificate for mTLS and its private key) (line 5)",
        ])
    }
}
