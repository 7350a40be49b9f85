// Readers for the `tls:` blocks of listeners (termination) and upstreams
// (origination). Only the shape is checked here (WeirCore does no I/O);
// the files themselves (readable PEM, key matching certificate) are checked
// by WeirProxy's `TLSFileCheck`, which reports with the same config paths.

import Yams

extension ListenerTLSConfig {
    /// ALPN protocols this build can serve; the TLS setup advertises what
    /// the config lists (default http/1.1 only). "h2" is served when the
    /// listener's `http2.enabled` is on (HTTP2DownstreamConnection).
    public static let supportedALPN: [String] = ["h2", "http/1.1"]

    /// TLS 1.2 suites by their OpenSSL/BoringSSL names (the `ciphers:` list).
    public static let knownCiphers: [String] = [
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-RSA-AES256-SHA",
        "AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-SHA", "AES256-SHA",
    ]
}

extension ConfigReader {
    func readListenerTLS(_ node: Node, _ path: String) -> ListenerTLSConfig? {
        guard let f = fields(node, path, known: [
            "certificates", "default_certificate", "min_version", "ciphers", "alpn", "client_ca", "client_auth",
            "handshake_timeout",
        ], required: ["certificates"]) else { return nil }
        var tls = ListenerTLSConfig()
        if let n = f["certificates"] {
            let items = list(n, f.path("certificates"))
            if items.isEmpty, case .sequence = n { report(f.path("certificates"), "at least one certificate is required", n) }
            for item in items {
                guard let c = fields(item.node, item.path, known: ["cert", "key", "server_names"], required: ["cert", "key"]),
                      let certNode = c["cert"], let keyNode = c["key"],
                      let cert = nonEmptyString(certNode, c.path("cert")), let key = nonEmptyString(keyNode, c.path("key"))
                else { continue }
                var certificate = TLSCertificateConfig(cert: cert, key: key)
                if let n = c["server_names"] {
                    for (i, name) in stringList(n, c.path("server_names")).enumerated() {
                        if ConfigReader.isServerName(name) {
                            certificate.serverNames.append(name.lowercased())
                        } else {
                            report(c.path("server_names") + "[\(i)]",
                                   "invalid server name \"\(name)\" (expected host.example.com or *.example.com)", n)
                        }
                    }
                }
                tls.certificates.append(certificate)
            }
        }
        if let n = f["default_certificate"], let index = int(n, f.path("default_certificate"), min: 0) {
            if index < tls.certificates.count {
                tls.defaultCertificate = index
            } else {
                report(f.path("default_certificate"), "no certificate at index \(index) (there are \(tls.certificates.count))", n)
            }
        }
        if let n = f["min_version"], let text = string(n, f.path("min_version")) {
            if let version = TLSMinimumVersion(rawValue: text) {
                tls.minVersion = version
            } else {
                report(f.path("min_version"), "unknown TLS version \"\(text)\" (expected 1.2 or 1.3)", n)
            }
        }
        if let n = f["ciphers"] {
            var ciphers: [String] = []
            for (i, name) in stringList(n, f.path("ciphers")).enumerated() {
                if ListenerTLSConfig.knownCiphers.contains(name) {
                    ciphers.append(name)
                } else {
                    var message = "unknown TLS 1.2 cipher suite \"\(name)\""
                    if let hint = ConfigCrossChecks.closest(to: name, in: Set(ListenerTLSConfig.knownCiphers)) {
                        message += " (did you mean \"\(hint)\"?)"
                    } else {
                        message += " (expected OpenSSL names such as ECDHE-RSA-AES128-GCM-SHA256)"
                    }
                    report(f.path("ciphers") + "[\(i)]", message, n)
                }
            }
            if ciphers.isEmpty, case .sequence(let s) = n, s.isEmpty {
                report(f.path("ciphers"), "must list at least one cipher suite (omit it for the defaults)", n)
            }
            tls.ciphers = ciphers
            if tls.minVersion == .v1_3 {
                report(f.path("ciphers"), "only applies to TLS 1.2, but min_version is 1.3", n)
            }
        }
        if let n = f["alpn"] {
            let protocols = stringList(n, f.path("alpn"))
            for (i, name) in protocols.enumerated() where !ListenerTLSConfig.supportedALPN.contains(name) {
                let reason = "unknown protocol"
                report(f.path("alpn") + "[\(i)]", "cannot advertise \"\(name)\": \(reason) (supported: \(ListenerTLSConfig.supportedALPN.joined(separator: ", ")))", n)
            }
            if protocols.isEmpty { report(f.path("alpn"), "must list at least one protocol", n) }
            tls.alpn = protocols
        }
        if let n = f["client_ca"] { tls.clientCA = nonEmptyString(n, f.path("client_ca")) }
        if let n = f["client_auth"] {
            tls.clientAuth = enumValue(n, f.path("client_auth"), as: ClientCertificateMode.self) ?? .required
            if f["client_ca"] == nil {
                report(f.path("client_auth"), "needs client_ca (the CAs client certificates are verified against)", n)
            }
        }
        if let n = f["handshake_timeout"] {
            tls.handshakeTimeout = duration(n, f.path("handshake_timeout")) ?? tls.handshakeTimeout
        }
        return tls
    }

    func readUpstreamTLS(_ node: Node, _ path: String) -> UpstreamTLSConfig? {
        guard let f = fields(node, path, known: ["enabled", "ca", "verify", "sni", "cert", "key"]) else { return nil }
        var tls = UpstreamTLSConfig()
        if let n = f["enabled"] { tls.enabled = bool(n, f.path("enabled")) ?? true }
        if let n = f["ca"] { tls.ca = nonEmptyString(n, f.path("ca")) }
        if let n = f["verify"] { tls.verify = bool(n, f.path("verify")) ?? true }
        if let n = f["sni"], let name = nonEmptyString(n, f.path("sni")) {
            if ConfigReader.isServerName(name) && !name.hasPrefix("*") {
                tls.sni = name.lowercased()
            } else {
                report(f.path("sni"), "invalid server name \"\(name)\"", n)
            }
        }
        if let n = f["cert"] { tls.cert = nonEmptyString(n, f.path("cert")) }
        if let n = f["key"] { tls.key = nonEmptyString(n, f.path("key")) }
        if (f["cert"] == nil) != (f["key"] == nil) {
            report(f["cert"] == nil ? f.path("key") : f.path("cert"),
                   "cert and key go together (the client certificate for mTLS and its private key)",
                   f["cert"] ?? f["key"])
        }
        return tls
    }

    /// `host.example.com` or `*.example.com`: letters, digits, `-`, dots.
    static func isServerName(_ name: String) -> Bool {
        var rest = Substring(name)
        if rest.hasPrefix("*.") { rest = rest.dropFirst(2) }
        guard !rest.isEmpty, rest.count <= 253 else { return false }
        return rest.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            !label.isEmpty && label.count <= 63 && label.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }
        }
    }
}

extension WeirConfig {
    /// Relative TLS file paths made absolute against `directory` (the
    /// config file's folder), so a reload from another working directory
    /// reads the same files.
    mutating func resolveTLSPaths(against directory: String) {
        func resolve(_ path: String) -> String {
            path.hasPrefix("/") || directory.isEmpty ? path : directory + "/" + path
        }
        for i in listeners.indices {
            guard var tls = listeners[i].tls else { continue }
            for j in tls.certificates.indices {
                tls.certificates[j].cert = resolve(tls.certificates[j].cert)
                tls.certificates[j].key = resolve(tls.certificates[j].key)
            }
            tls.clientCA = tls.clientCA.map(resolve)
            listeners[i].tls = tls
        }
        for i in upstreams.indices {
            guard var tls = upstreams[i].tls else { continue }
            tls.ca = tls.ca.map(resolve)
            tls.cert = tls.cert.map(resolve)
            tls.key = tls.key.map(resolve)
            upstreams[i].tls = tls
        }
    }
}
