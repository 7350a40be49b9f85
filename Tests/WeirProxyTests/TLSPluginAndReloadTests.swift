// weir.client.get_tls() from Lua over real TLS connections, plugin phases
// and limits over HTTPS, and certificate hot reload mid-traffic.

import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import WeirCore
@testable import WeirProxy
import XCTest

final class TLSPluginTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var upstream: TestUpstream!
    private var folder: PluginFolder!
    private let pki = TestPKI.shared

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try TestUpstream(group: group)
        folder = try PluginFolder()
        try folder.write("identity", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:connection(conf, conn)
          local tls = conn:get_tls()
          if conf.require_identity and not (tls and tls.client_cert) then
            conn:reject("client certificate required")
            return
          end
          conn.data.seen_in_connection = tls and (tls.version .. "/" .. (conn:get_sni() or "-")) or "plain"
        end
        function P:request(conf, ctx)
          local tls = weir.client.get_tls()
          if not tls then
            weir.upstream.request.set_header("x-tls", "none")
            return
          end
          local cert = tls.client_cert
          weir.upstream.request.set_header("x-tls", tls.version .. "|" .. (tls.sni or "-") .. "|" .. (tls.alpn or "-") .. "|" .. (tls.cipher or "-"))
          weir.upstream.request.set_header("x-conn", weir.conn.seen_in_connection)
          if cert then
            weir.upstream.request.set_header("x-client-subject", cert.subject)
            weir.upstream.request.set_header("x-client-spiffe", cert.spiffe_id or "-")
            weir.upstream.request.set_header("x-client-uri", cert.san.uri[1] or "-")
            weir.upstream.request.set_header("x-client-dns", cert.san.dns[1] or "-")
            weir.upstream.request.set_header("x-client-email", cert.san.email[1] or "-")
            weir.upstream.request.set_header("x-client-fp", cert.fingerprint_sha256)
          end
        end
        function P:response(conf, ctx)
          weir.response.set_header("x-response-phase", weir.client.get_tls() and "tls" or "plain")
        end
        return P
        """, schema: """
        return { fields = { require_identity = { type = "boolean", default = false, description = "reject clients without a certificate" } } }
        """)
    }

    override func tearDownWithError() throws {
        upstream.stop()
        try group.syncShutdownGracefully()
        folder.remove()
    }

    private func config(requireIdentity: Bool = false, configure: (inout WeirConfig) -> Void = { _ in }) -> WeirConfig {
        let tls = ListenerTLSConfig.test(pki, certificates: ["a"]) {
            $0.clientCA = self.pki.cert("ca")
            $0.clientAuth = .optional
        }
        return httpsConfig(targets: [upstream.address], tls: tls) {
            $0.plugins = [pluginRef("identity", .map(["require_identity": .bool(requireIdentity)]))]
            configure(&$0)
        }
    }

    func testGetTLSInConnectionRequestAndResponsePhasesWithSPIFFEIdentity() throws {
        let proxy = try PluginProxy(config: config(), folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try TLSTestClient(group: group, port: proxy.harness.port, serverName: "a.example.com", ca: pki.cert("ca"),
                                       clientCert: pki.cert("client"), clientKey: pki.key("client"))
        defer { client.close() }
        let (status, _) = try client.get("/who")
        XCTAssertEqual(status, 200)
        XCTAssertEqual(client.lastHeaders["x-response-phase"], "tls")
        let seen = try XCTUnwrap(upstream.lastRequest)
        let parts = (seen.header("x-tls") ?? "").split(separator: "|").map(String.init)
        XCTAssertEqual(parts.count, 4)
        XCTAssertEqual(parts.first, "TLSv1.3")
        XCTAssertEqual(parts.dropFirst().first, "a.example.com")
        XCTAssertEqual(parts.dropFirst(2).first, "http/1.1")
        XCTAssertEqual(parts.last, "TLS_AES_128_GCM_SHA256")
        XCTAssertEqual(seen.header("x-conn"), "TLSv1.3/a.example.com")
        // RFC 4514 order: last RDN first (the certificate lists CN, then O).
        XCTAssertEqual(seen.header("x-client-subject"), "O=Weir Tests,CN=alice")
        XCTAssertEqual(seen.header("x-client-spiffe"), "spiffe://weir.test/ns/default/sa/alice")
        XCTAssertEqual(seen.header("x-client-uri"), "spiffe://weir.test/ns/default/sa/alice")
        XCTAssertEqual(seen.header("x-client-dns"), "alice.internal")
        XCTAssertEqual(seen.header("x-client-email"), "alice@weir.test")
        XCTAssertEqual(seen.header("x-client-fp"), try pki.fingerprint("client"))
    }

    func testConnectionPhaseRejectsClientsWithoutACertificate() throws {
        let proxy = try PluginProxy(config: config(requireIdentity: true), folder: folder, loops: 1)
        defer { proxy.stop() }
        let anonymous = try Curl.https(host: "a.example.com", port: proxy.harness.port, ca: pki.cert("ca"))
        XCTAssertEqual(anonymous.status, 0, "the plugin closes the connection before any response")
        // The request bytes that came with the handshake's end were dropped, not served
        // (before the fix they reached the request phase of a rejected connection).
        usleep(100_000)
        XCTAssertEqual(proxy.harness.observer.records.count, 0)
        XCTAssertEqual(upstream.requests.count, 0)
        let identified = try Curl.https(host: "a.example.com", port: proxy.harness.port, ca: pki.cert("ca"),
                                        extra: ["--cert", pki.cert("client"), "--key", pki.key("client")])
        XCTAssertEqual(identified.status, 200, identified.result.stderr)
        XCTAssertEqual(upstream.lastRequest?.header("x-client-spiffe"), "spiffe://weir.test/ns/default/sa/alice")
        XCTAssertEqual(upstream.requests.count, 1)
    }

    func testGetTLSIsNilOnPlainConnectionsAndWithoutAClientCertificate() throws {
        var plainConfig = config()
        plainConfig.listeners[0].protocol = .http
        plainConfig.listeners[0].tls = nil
        let plain = try PluginProxy(config: plainConfig, folder: folder, loops: 1)
        let response = try plain.connect().request("GET", "/")
        XCTAssertEqual(response.status, 200)
        XCTAssertEqual(upstream.lastRequest?.header("x-tls"), "none")
        XCTAssertEqual(response.header("x-response-phase"), "plain")
        plain.stop()

        let tls = try PluginProxy(config: config(), folder: folder, loops: 1)
        defer { tls.stop() }
        let curl = try Curl.https(host: "a.example.com", port: tls.harness.port, ca: pki.cert("ca"), extra: ["--tlsv1.2", "--tls-max", "1.2"])
        XCTAssertEqual(curl.status, 200, curl.result.stderr)
        let seen = try XCTUnwrap(upstream.lastRequest)
        XCTAssertTrue(seen.header("x-tls")?.hasPrefix("TLSv1.2|a.example.com|http/1.1|ECDHE-") ?? false, "\(seen.header("x-tls") ?? "nil")")
        XCTAssertNil(seen.header("x-client-subject"), "no client certificate, no client_cert table")
    }

    func testListenerLimitsApplyOverHTTPS() throws {
        let proxy = try PluginProxy(config: config { $0.listeners[0].limits.maxRequestLineBytes = 64 }, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try TLSTestClient(group: group, port: proxy.harness.port, serverName: "a.example.com", ca: pki.cert("ca"))
        defer { client.close() }
        XCTAssertEqual(try client.get("/" + String(repeating: "x", count: 100)).0, 414)
    }
}

final class TLSReloadTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var upstream: TestUpstream!
    private var folder: PluginFolder!
    private let pki = TestPKI.shared

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        upstream = try TestUpstream(group: group)
        folder = try PluginFolder()
    }

    override func tearDownWithError() throws {
        upstream.stop()
        try group.syncShutdownGracefully()
        folder.remove()
    }

    private var certPath: String { folder.root + "/server.pem" }
    private var keyPath: String { folder.root + "/server.key" }

    /// Installs `name`'s certificate and key as the listener's files.
    private func install(_ name: String) throws {
        for (from, to) in [(pki.cert(name), certPath), (pki.key(name), keyPath)] {
            let data = try Data(contentsOf: URL(fileURLWithPath: from))
            try data.write(to: URL(fileURLWithPath: to + ".tmp"))
            _ = rename(to + ".tmp", to)      // atomic, like a cert manager's rotation
        }
    }

    private func start(watch: Bool) throws -> PluginProxy {
        try install("a")
        let yaml = """
        listeners:
          - name: web
            listen: 127.0.0.1:0
            protocol: https
            tls:
              certificates:
                - { cert: server.pem, key: server.key }
        upstreams:
          - name: backend
            targets: [\(upstream.address)]
        routes:
          - name: all
            upstream: backend
        plugin_paths: [\(folder.pluginsDir)]
        access_log: off
        """
        let path = folder.root + "/weir.yaml"
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
        let config = try ConfigLoader.load(path: path, fileChecks: TLSFileCheck.issues)
        XCTAssertEqual(config.listeners[0].tls?.certificates.first?.cert, certPath, "relative to the config file")
        let proxy = try PluginProxy(config: config, folder: folder, configPath: path, loops: 1)
        if watch { proxy.generations.startWatching(interval: 0.05) }
        return proxy
    }

    private func servedName(_ port: Int) throws -> String? {
        let client = try TLSTestClient(group: group, port: port, serverName: "a.example.com", ca: nil)
        defer { client.close() }
        XCTAssertEqual(try client.get("/").0, 200)
        return client.serverCommonName
    }

    func testReloadSwapsTheCertificateForNewHandshakesOnlyAndRefusesABrokenFile() throws {
        let proxy = try start(watch: false)
        defer { proxy.stop() }
        let port = proxy.harness.port
        let kept = try TLSTestClient(group: group, port: port, serverName: "a.example.com", ca: pki.cert("ca"))
        defer { kept.close() }
        XCTAssertEqual(try kept.get("/before").0, 200)
        XCTAssertEqual(kept.serverCommonName, "a.example.com")

        try install("wild")
        guard case .success = proxy.generations.reload() else { return XCTFail("reload failed: \(proxy.generations.status)") }
        XCTAssertEqual(try servedName(port), "wildcard", "a new handshake gets the new certificate")
        XCTAssertEqual(try kept.get("/after").0, 200, "the open connection keeps working")
        XCTAssertEqual(kept.serverCommonName, "a.example.com", "on the session it started with")

        // A truncated key: the reload is refused, the wildcard certificate keeps serving.
        try "-----BEGIN PRIVATE KEY-----\nAAAA\n".write(toFile: keyPath, atomically: true, encoding: .utf8)
        guard case .failure(let error) = proxy.generations.reload() else { return XCTFail("a broken key must fail the reload") }
        XCTAssertTrue(error.description.contains("listeners[0].tls.certificates[0].key"), error.description)
        XCTAssertTrue(error.description.contains("not a readable PEM private key"), error.description)
        XCTAssertTrue(proxy.generations.statusJSON.contains("not a readable PEM private key"), proxy.generations.statusJSON)
        XCTAssertEqual(try servedName(port), "wildcard")
        XCTAssertEqual(try kept.get("/still").0, 200)

        // A key that belongs to another certificate is refused as well.
        try Data(contentsOf: URL(fileURLWithPath: pki.key("a"))).write(to: URL(fileURLWithPath: keyPath))
        try Data(contentsOf: URL(fileURLWithPath: pki.cert("wild"))).write(to: URL(fileURLWithPath: certPath))
        guard case .failure(let mismatch) = proxy.generations.reload() else { return XCTFail("a mismatched key must fail the reload") }
        XCTAssertTrue(mismatch.description.contains("does not match the certificate"), mismatch.description)
        XCTAssertTrue(proxy.generations.statusJSON.contains("\"tls\":{\"web\":[{\"cert\":"), proxy.generations.statusJSON)
    }

    func testWatcherReloadsChangedFilesWhileRequestsKeepFlowing() throws {
        let proxy = try start(watch: true)
        defer { proxy.stop() }
        let port = proxy.harness.port
        let failures = NIOLockedValueBox<[String]>([])
        let served = NIOLockedValueBox(0)
        let stop = NIOLockedValueBox(false)
        let group = self.group!
        // Traffic on one keep-alive connection and on new connections while the files change.
        let traffic = Thread {
            do {
                let kept = try TLSTestClient(group: group, port: port, serverName: "a.example.com", ca: nil)
                defer { kept.close() }
                while !stop.withLockedValue({ $0 }) {
                    let (status, _) = try kept.get("/kept")
                    if status != 200 { failures.withLockedValue { $0.append("kept: \(status)") } }
                    let fresh = try TLSTestClient(group: group, port: port, serverName: "a.example.com", ca: nil)
                    let (freshStatus, _) = try fresh.get("/fresh")
                    fresh.close()
                    if freshStatus != 200 { failures.withLockedValue { $0.append("fresh: \(freshStatus)") } }
                    served.withLockedValue { $0 += 2 }
                }
            } catch {
                failures.withLockedValue { $0.append("\(error)") }
            }
        }
        traffic.start()
        defer {
            stop.withLockedValue { $0 = true }
            while !traffic.isFinished { usleep(1000) }
        }
        usleep(100_000)
        try install("wild")
        let deadline = Date().addingTimeInterval(10)
        var name = try servedName(port)
        while name != "wildcard" && Date() < deadline {
            usleep(50_000)
            name = try servedName(port)
        }
        XCTAssertEqual(name, "wildcard", "the watcher reloaded the changed certificate")
        stop.withLockedValue { $0 = true }
        while !traffic.isFinished { usleep(1000) }
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        XCTAssertGreaterThan(served.withLockedValue { $0 }, 0)
    }
}
