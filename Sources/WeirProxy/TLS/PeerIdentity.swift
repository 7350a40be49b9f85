import Crypto
import NIOSSL
import WeirCore
import X509

/// Turns a verified peer certificate into the identity plugins and the
/// access log see (subject, SANs incl. SPIFFE URIs, SHA-256 fingerprint).
enum PeerIdentity {
    static func describe(_ certificate: NIOSSLCertificate) -> PeerCertificateInfo? {
        guard let der = try? certificate.toDERBytes() else { return nil }
        let fingerprint = SHA256.hash(data: der).map { byte -> String in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
        let serial = certificate.serialNumber.map { byte -> String in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
        var info = PeerCertificateInfo(
            subject: "", issuer: "",
            commonName: certificate.subjectName.last { $0.type == .commonName }?.value,
            dnsNames: [], uris: [], ipAddresses: [], emails: [], fingerprintSHA256: fingerprint, serial: serial,
            notBefore: Int(certificate.notValidBefore), notAfter: Int(certificate.notValidAfter))
        guard let parsed = try? Certificate(derEncoded: der) else { return info }
        info.subject = parsed.subject.description
        info.issuer = parsed.issuer.description
        if let names = try? parsed.extensions.subjectAlternativeNames {
            for name in names {
                switch name {
                case .dnsName(let dns): info.dnsNames.append(dns)
                case .uniformResourceIdentifier(let uri): info.uris.append(uri)
                case .rfc822Name(let email): info.emails.append(email)
                case .ipAddress(let octets): info.ipAddresses.append(ipText(Array(octets.bytes)))
                default: break
                }
            }
        }
        return info
    }

    private static func ipText(_ bytes: [UInt8]) -> String {
        if bytes.count == 4 { return bytes.map(String.init).joined(separator: ".") }
        guard bytes.count == 16 else { return bytes.map { String($0, radix: 16) }.joined(separator: ":") }
        var groups: [String] = []
        for i in stride(from: 0, to: 16, by: 2) { groups.append(String(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]), radix: 16)) }
        return groups.joined(separator: ":")
    }
}
