import Foundation
import NIOSSL
import WeirCore
import X509

/// One `protocol: https` listener's TLS contexts, built from its `tls:`
/// block: one `NIOSSLContext` per certificate, chosen per connection by the
/// ClientHello's SNI before BoringSSL sees the handshake (exact name, then
/// the wildcard one label up, then the default certificate).
///
/// Immutable. A reload builds a new one and swaps it into `ListenerTLS`;
/// connections keep the context they were accepted with.
final class ServerTLSContexts: @unchecked Sendable {
    struct Served {
        let context: NIOSSLContext
        /// Names it serves, for logs and /status.
        let names: [String]
        let notAfter: Int
        let certPath: String
    }

    let certificates: [Served]
    private let exact: [String: Int]
    /// `*.example.com` is stored as "example.com".
    private let wildcard: [String: Int]
    private let defaultIndex: Int

    /// Throws `TLSFileProblems` naming each config path that is wrong.
    init(config tls: ListenerTLSConfig, path: String) throws {
        var problems: [ConfigIssue] = []
        let trust: [NIOSSLCertificate]? = tls.clientCA.flatMap { ca in
            TLSFiles.certificates(ca, path: path + ".client_ca", problems: &problems)
        }
        var served: [Served] = []
        var exact: [String: Int] = [:]
        var wildcard: [String: Int] = [:]
        for (index, certificate) in tls.certificates.enumerated() {
            let certPath = path + ".certificates[\(index)]"
            guard let pair = TLSFiles.keyPair(cert: certificate.cert, key: certificate.key, path: certPath, problems: &problems)
            else { continue }
            var configuration = TLSConfiguration.makeServerConfiguration(
                certificateChain: pair.chain.map { .certificate($0) }, privateKey: .privateKey(pair.key))
            configuration.minimumTLSVersion = tls.minVersion == .v1_3 ? .tlsv13 : .tlsv12
            if let ciphers = tls.ciphers { configuration.cipherSuites = ciphers.joined(separator: ":") }
            configuration.applicationProtocols = tls.alpn
            // After our close_notify, wait only briefly for the client's:
            // many clients never send one, and swift-nio-ssl's default (5 s)
            // kept every closed connection's socket open that long.
            configuration.shutdownTimeout = .milliseconds(200)
            if let trust {
                configuration.trustRoots = .certificates(trust)
                configuration.certificateVerification = tls.clientAuth == .required ? .noHostnameVerification : .optionalVerification
                configuration.sendCANameList = true
            }
            let context: NIOSSLContext
            do {
                context = try NIOSSLContext(configuration: configuration)
            } catch {
                problems.append(ConfigIssue(path: certPath, message: "cannot build a TLS context: \(TLSFiles.describe(error))"))
                continue
            }
            let names = certificate.serverNames.isEmpty ? TLSFiles.dnsNames(of: pair.chain[0]) : certificate.serverNames
            for name in names {
                if name.hasPrefix("*.") {
                    if wildcard[String(name.dropFirst(2))] == nil { wildcard[String(name.dropFirst(2))] = served.count }
                } else if exact[name] == nil {
                    exact[name] = served.count
                }
            }
            served.append(Served(context: context, names: names, notAfter: Int(pair.chain[0].notValidAfter),
                                 certPath: certificate.cert))
        }
        if !problems.isEmpty { throw TLSFileProblems(issues: problems) }
        self.certificates = served
        self.exact = exact
        self.wildcard = wildcard
        self.defaultIndex = min(tls.defaultCertificate, served.count - 1)
    }

    /// The context for a ClientHello's server name (lower-cased).
    func context(forServerName name: String?) -> NIOSSLContext {
        guard let name, !name.isEmpty else { return certificates[defaultIndex].context }
        let host = name.hasSuffix(".") ? String(name.dropLast()) : name
        if let i = exact[host] { return certificates[i].context }
        // A wildcard covers exactly one label: *.example.com serves a.example.com only.
        if let dot = host.firstIndex(of: "."), let i = wildcard[String(host[host.index(after: dot)...])] {
            return certificates[i].context
        }
        return certificates[defaultIndex].context
    }
}

/// Problems with TLS files, as config issues (path + message).
struct TLSFileProblems: Error, CustomStringConvertible {
    var issues: [ConfigIssue]
    var description: String { issues.map(\.description).joined(separator: "; ") }
}

/// Reading PEM files with messages that say which file and what is wrong.
enum TLSFiles {
    static func readable(_ file: String, path: String, problems: inout [ConfigIssue]) -> Bool {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: file, isDirectory: &isDirectory) else {
            problems.append(ConfigIssue(path: path, message: "file not found: \(file)"))
            return false
        }
        guard !isDirectory.boolValue, FileManager.default.isReadableFile(atPath: file) else {
            problems.append(ConfigIssue(path: path, message: "cannot read \(file)"))
            return false
        }
        return true
    }

    /// Every certificate of a PEM file (a chain or a CA bundle).
    static func certificates(_ file: String, path: String, problems: inout [ConfigIssue]) -> [NIOSSLCertificate]? {
        guard readable(file, path: path, problems: &problems) else { return nil }
        let list: [NIOSSLCertificate]
        do {
            list = try NIOSSLCertificate.fromPEMFile(file)
        } catch {
            problems.append(ConfigIssue(path: path, message: "\(file) is not a readable PEM certificate file (\(describe(error)))"))
            return nil
        }
        guard !list.isEmpty else {
            problems.append(ConfigIssue(path: path, message: "\(file) holds no PEM certificate"))
            return nil
        }
        return list
    }

    static func privateKey(_ file: String, path: String, problems: inout [ConfigIssue]) -> (NIOSSLPrivateKey, String)? {
        guard readable(file, path: path, problems: &problems) else { return nil }
        do {
            let pem = try String(contentsOfFile: file, encoding: .utf8)
            return (try NIOSSLPrivateKey(bytes: Array(pem.utf8), format: .pem), pem)
        } catch {
            problems.append(ConfigIssue(path: path, message: "\(file) is not a readable PEM private key (\(describe(error)))"))
            return nil
        }
    }

    /// A certificate chain and its key, checked to belong together.
    static func keyPair(cert: String, key: String, path: String,
                        problems: inout [ConfigIssue]) -> (chain: [NIOSSLCertificate], key: NIOSSLPrivateKey)? {
        let chain = certificates(cert, path: path + ".cert", problems: &problems)
        let privateKey = privateKey(key, path: path + ".key", problems: &problems)
        guard let chain, let (privateKey, keyPEM) = privateKey else { return nil }
        if !keyMatches(chain[0], keyPEM: keyPEM) {
            problems.append(ConfigIssue(path: path + ".key",
                                        message: "\(key) does not match the certificate in \(cert) (different public key)"))
            return nil
        }
        return (chain, privateKey)
    }

    /// Compares the leaf's public key with the key's. A key type
    /// swift-certificates cannot read is let through: BoringSSL still
    /// refuses a mismatch when the context is built.
    static func keyMatches(_ certificate: NIOSSLCertificate, keyPEM: String) -> Bool {
        guard let der = try? certificate.toDERBytes(), let parsed = try? Certificate(derEncoded: der),
              let key = try? Certificate.PrivateKey(pemEncoded: keyPEM) else { return true }
        return parsed.publicKey == key.publicKey
    }

    /// DNS SANs of a certificate, else its common name (lower-cased).
    static func dnsNames(of certificate: NIOSSLCertificate) -> [String] {
        var names: [String] = []
        for name in certificate._subjectAlternativeNames() where name.nameType == .dnsName {
            names.append(String(decoding: name.contents, as: UTF8.self).lowercased())
        }
        if names.isEmpty, let cn = certificate.subjectName.last(where: { $0.type == .commonName }) {
            names.append(cn.value.lowercased())
        }
        return names
    }

    static func describe(_ error: Error) -> String {
        if let ssl = error as? NIOSSLError { return "\(ssl)" }
        return String(describing: error)
    }
}
