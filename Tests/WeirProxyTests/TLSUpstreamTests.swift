// Upstream TLS (origination): verification on by default, wrong CA and
// wrong name give 502 with the reason, mTLS, one handshake per pooled
// connection, TLS health probes. Real TLS servers on loopback.

import Foundation
import NIOCore
import NIOPosix
import WeirCore
@testable import WeirProxy
import XCTest

final class TLSUpstreamTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private let pki = TestPKI.shared

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        try? group.syncShutdownGracefully()
    }

    private func upstreamTLS(_ configure: (inout UpstreamTLSConfig) -> Void = { _ in }) -> UpstreamTLSConfig {
        var tls = UpstreamTLSConfig()
        tls.ca = pki.cert("ca")
        configure(&tls)
        return tls
    }

    /// Plain HTTP downstream, TLS upstream; one loop so the pool is shared.
    private func proxy(to upstream: TLSTestUpstream, tls: UpstreamTLSConfig) throws -> ProxyHarness {
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.upstreams[0].tls = tls
            $0.upstreams[0].retries = 0
        }
        return try ProxyHarness(config: config, loops: 1)
    }

    func testVerifiedUpstreamByIPAndBySNIAndOneHandshakePerPooledConnection() throws {
        let upstream = try TLSTestUpstream(group: group, name: "secure", cert: pki.cert("localhost"), key: pki.key("localhost"))
        defer { upstream.stop() }
        // The target is 127.0.0.1: without sni the certificate's IP SAN is checked.
        let byIP = try proxy(to: upstream, tls: upstreamTLS())
        let client = try byIP.connect()
        for _ in 0..<5 {
            let response = try client.request("GET", "/x")
            XCTAssertEqual(response.status, 200)
            XCTAssertEqual(response.bodyText, "ok from secure (client -)")
        }
        XCTAssertEqual(upstream.connections, 1, "keep-alive pool: one TLS handshake for five requests")
        byIP.stop()
        let bySNI = try proxy(to: upstream, tls: upstreamTLS { $0.sni = "localhost" })
        defer { bySNI.stop() }
        XCTAssertEqual(try bySNI.connect().request("GET", "/").status, 200)
    }

    func testWrongCAGives502WithTheReason() throws {
        let upstream = try TLSTestUpstream(group: group, name: "impostor", cert: pki.cert("other-localhost"),
                                           key: pki.key("other-localhost"))
        defer { upstream.stop() }
        let harness = try proxy(to: upstream, tls: upstreamTLS())
        defer { harness.stop() }
        let response = try harness.connect().request("GET", "/")
        XCTAssertEqual(response.status, 502)
        XCTAssertTrue(response.bodyText.contains("TLS handshake with upstream 127.0.0.1:\(upstream.port) failed"), response.bodyText)
        XCTAssertTrue(response.bodyText.contains("certificate verify failed"), response.bodyText)
    }

    func testWrongHostNameGives502AndVerifyFalseAcceptsAnything() throws {
        // A certificate for a.example.com only (no IP SAN: swift-nio-ssl
        // also accepts a certificate naming the connected IP, whatever the name).
        let upstream = try TLSTestUpstream(group: group, name: "named", cert: pki.cert("a"), key: pki.key("a"))
        defer { upstream.stop() }
        let wrongName = try proxy(to: upstream, tls: upstreamTLS { $0.sni = "orders.internal" })
        let response = try wrongName.connect().request("GET", "/")
        XCTAssertEqual(response.status, 502)
        XCTAssertTrue(response.bodyText.contains("does not match the expected host name"), response.bodyText)
        wrongName.stop()
        let noName = try proxy(to: upstream, tls: upstreamTLS())
        XCTAssertEqual(try noName.connect().request("GET", "/").status, 502, "an IP target needs an IP SAN (or sni)")
        noName.stop()
        let rightName = try proxy(to: upstream, tls: upstreamTLS { $0.sni = "a.example.com" })
        XCTAssertEqual(try rightName.connect().request("GET", "/").status, 200)
        rightName.stop()

        let impostor = try TLSTestUpstream(group: group, name: "impostor", cert: pki.cert("other-localhost"),
                                           key: pki.key("other-localhost"))
        defer { impostor.stop() }
        let unverified = try proxy(to: impostor, tls: upstreamTLS { $0.verify = false; $0.sni = "anything.test" })
        defer { unverified.stop() }
        XCTAssertEqual(try unverified.connect().request("GET", "/").status, 200)
    }

    func testMutualTLSToTheUpstream() throws {
        let upstream = try TLSTestUpstream(group: group, name: "mtls", cert: pki.cert("localhost"), key: pki.key("localhost"),
                                           clientCA: pki.cert("ca"))
        defer { upstream.stop() }
        let anonymous = try proxy(to: upstream, tls: upstreamTLS())
        XCTAssertEqual(try anonymous.connect().request("GET", "/").status, 502, "the upstream requires a client certificate")
        anonymous.stop()
        let withCert = try proxy(to: upstream, tls: upstreamTLS { $0.cert = self.pki.cert("client"); $0.key = self.pki.key("client") })
        defer { withCert.stop() }
        let response = try withCert.connect().request("GET", "/")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(response.bodyText, "ok from mtls (client alice)")
    }

    func testHealthProbesSpeakTLSAndFailOnAnUntrustedCertificate() throws {
        let good = try TLSTestUpstream(group: group, name: "good", cert: pki.cert("localhost"), key: pki.key("localhost"))
        let bad = try TLSTestUpstream(group: group, name: "bad", cert: pki.cert("other-localhost"), key: pki.key("other-localhost"))
        defer { good.stop(); bad.stop() }
        let context = try UpstreamTLSContext(config: upstreamTLS(), path: "upstreams[0].tls")
        let loop = group.next()
        let status = try HealthProbe.run(on: loop, address: good.address, path: "/healthz", timeout: .seconds(5),
                                         tls: { context }).wait()
        XCTAssertEqual(status, 200)
        XCTAssertThrowsError(try HealthProbe.run(on: loop, address: bad.address, path: "/healthz", timeout: .seconds(5),
                                                 tls: { context }).wait())
        // A plain probe to a TLS port gets no HTTP answer either.
        XCTAssertThrowsError(try HealthProbe.run(on: loop, address: good.address, path: "/healthz", timeout: .seconds(2)).wait())
    }
}
