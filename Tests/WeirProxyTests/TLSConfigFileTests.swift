// `weir validate` / reload checks of the files a tls: block names: each
// problem with its config path and YAML line.

import Foundation
import WeirCore
import WeirProxy
import XCTest

final class TLSConfigFileTests: XCTestCase {
    private let pki = TestPKI.shared

    private func problems(_ tls: String, upstreamTLS: String = "") throws -> [String] {
        let dir = NSTemporaryDirectory() + "weir-tlscfg-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
            .write(toFile: dir + "/garbage.pem", atomically: true, encoding: .utf8)
        let path = dir + "/weir.yaml"
        try """
        listeners:
          - name: web
            listen: 127.0.0.1:0
            protocol: https
            tls:
        \(tls)
        upstreams:
          - name: b
            targets: [127.0.0.1:9000]
        \(upstreamTLS)
        routes: [{ name: r, upstream: b }]
        """.write(toFile: path, atomically: true, encoding: .utf8)
        do {
            _ = try ConfigLoader.load(path: path, fileChecks: TLSFileCheck.issues)
            return []
        } catch let errors as ConfigErrors {
            return errors.issues.map { $0.description.replacingOccurrences(of: dir, with: "DIR").replacingOccurrences(of: pki.dir, with: "PKI") }
        }
    }

    func testGoodFilesPass() throws {
        XCTAssertEqual(try problems("""
              certificates: [{ cert: \(pki.cert("a")), key: \(pki.key("a")) }]
              client_ca: \(pki.cert("ca"))
        """, upstreamTLS: "    tls: { ca: \(pki.cert("ca")), cert: \(pki.cert("client")), key: \(pki.key("client")) }"), [])
    }

    func testMissingUnreadableAndMismatchedFiles() throws {
        let found = try problems("""
              certificates:
                - { cert: missing.pem, key: missing.key }
                - { cert: garbage.pem, key: \(pki.key("a")) }
                - { cert: \(pki.cert("a")), key: \(pki.key("wild")) }
              client_ca: \(pki.key("a"))
        """, upstreamTLS: "    tls: { ca: nowhere.pem }")
        XCTAssertEqual(found.filter { !$0.contains("garbage") }.sorted(), [
            "listeners[0].tls.certificates[0].cert: file not found: DIR/missing.pem (line 7)",
            "listeners[0].tls.certificates[0].key: file not found: DIR/missing.key (line 7)",
            "listeners[0].tls.certificates[2].key: PKI/wild.key does not match the certificate in PKI/a.pem (different public key) (line 9)",
            "listeners[0].tls.client_ca: PKI/a.key is not a readable PEM certificate file (failedToLoadCertificate) (line 10)",
            "upstreams[0].tls.ca: file not found: DIR/nowhere.pem (line 14)",
        ].sorted())
        XCTAssertTrue(found.contains { $0.hasPrefix("listeners[0].tls.certificates[1].cert: DIR/garbage.pem is not a readable PEM certificate file") && $0.hasSuffix("(line 8)") }, "\(found)")
    }
}
