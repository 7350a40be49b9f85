/// What one TLS-terminated downstream connection negotiated, and who the
/// client proved to be. Built once per connection after the handshake
/// (WeirProxy's `TLSHandshakeRecorder`), read by `weir.client.get_tls()`
/// and the access log. Plain values: no NIO, no BoringSSL.
public final class TLSConnectionInfo: Sendable {
    /// "TLSv1.2" or "TLSv1.3".
    public let version: String
    /// IANA name of the negotiated suite, e.g. "TLS_AES_128_GCM_SHA256"
    /// (or "0xC02F" for a suite without a known name); nil if not seen.
    public let cipher: String?
    /// The server name the client sent (SNI), lower-cased; nil without SNI.
    public let serverName: String?
    /// The ALPN protocol agreed on; nil when the client offered none.
    public let alpn: String?
    /// The client certificate, when one was presented and verified.
    public let peer: PeerCertificateInfo?

    public init(version: String, cipher: String?, serverName: String?, alpn: String?, peer: PeerCertificateInfo?) {
        self.version = version
        self.cipher = cipher
        self.serverName = serverName
        self.alpn = alpn
        self.peer = peer
    }
}

/// The identity in a verified client certificate.
public struct PeerCertificateInfo: Hashable, Sendable {
    /// RFC 4514 form (the certificate's last RDN first): "CN=alice,O=Example"
    /// for a subject written /O=Example/CN=alice.
    public var subject: String
    public var issuer: String
    public var commonName: String?
    public var dnsNames: [String]
    /// URI SANs, SPIFFE IDs (`spiffe://trust-domain/path`) among them.
    public var uris: [String]
    public var ipAddresses: [String]
    public var emails: [String]
    /// Lower-case hex SHA-256 of the DER certificate (no separators).
    public var fingerprintSHA256: String
    /// Hex serial number.
    public var serial: String
    /// Validity, seconds since 1970.
    public var notBefore: Int
    public var notAfter: Int

    public init(subject: String, issuer: String, commonName: String?, dnsNames: [String], uris: [String],
                ipAddresses: [String], emails: [String], fingerprintSHA256: String, serial: String,
                notBefore: Int, notAfter: Int) {
        self.subject = subject; self.issuer = issuer; self.commonName = commonName
        self.dnsNames = dnsNames; self.uris = uris; self.ipAddresses = ipAddresses; self.emails = emails
        self.fingerprintSHA256 = fingerprintSHA256; self.serial = serial
        self.notBefore = notBefore; self.notAfter = notAfter
    }

    /// The first `spiffe://` URI SAN (a workload's SPIFFE ID), if any.
    public var spiffeID: String? { uris.first { $0.lowercased().hasPrefix("spiffe://") } }
}
