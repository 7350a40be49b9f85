// Password credentials (`consumers[].credentials.<plugin>[].password`, used
// by basic-auth) are never kept in plain text past config loading: a plain
// password is hashed with PBKDF2-HMAC-SHA256 when the generation is built
// (WeirLua's ConsumerCredentials), and an operator may give the hash instead
// in the form below so plain passwords need not be in config files at all.
//
//   pbkdf2-sha256$<iterations>$<salt, base64>$<derived key, base64>
//
// base64 is either alphabet, padding optional. This file only parses and
// checks the form (no crypto in WeirCore).

import Foundation
import Yams

public struct PasswordHash: Hashable, Sendable {
    public static let prefix = "pbkdf2-sha256$"
    /// Defaults for plain passwords hashed at load. 10,000 iterations keeps a
    /// first (uncached) verification at a few milliseconds of one core.
    public static let defaultIterations = 10_000
    public static let iterationRange = 1_000...10_000_000
    public static let saltBytes = 16
    public static let keyBytes = 32

    public var iterations: Int
    public var salt: [UInt8]
    public var derivedKey: [UInt8]

    public init(iterations: Int, salt: [UInt8], derivedKey: [UInt8]) {
        self.iterations = iterations; self.salt = salt; self.derivedKey = derivedKey
    }

    /// Whether `text` claims to be a hash (so a malformed one is an error,
    /// never taken as a plain password).
    public static func looksHashed(_ text: String) -> Bool { text.hasPrefix("pbkdf2-") }

    /// Parses the string form; the error says what is wrong.
    public static func parse(_ text: String) -> Result<PasswordHash, PasswordHashError> {
        guard text.hasPrefix(prefix) else {
            return .failure(.init("unsupported password hash (expected \(prefix)<iterations>$<salt>$<hash>)"))
        }
        let parts = text.dropFirst(prefix.count).split(separator: "$", omittingEmptySubsequences: false)
        guard parts.count == 3 else { return .failure(.init("expected \(prefix)<iterations>$<salt>$<hash>")) }
        guard let iterations = Int(parts[0]), iterationRange.contains(iterations) else {
            return .failure(.init("iterations must be an integer in \(iterationRange.lowerBound)...\(iterationRange.upperBound)"))
        }
        guard let salt = base64Decode(String(parts[1])), salt.count >= 8 else {
            return .failure(.init("salt must be base64 of at least 8 bytes"))
        }
        guard let key = base64Decode(String(parts[2])), key.count >= 16, key.count <= 64 else {
            return .failure(.init("hash must be base64 of 16 to 64 bytes"))
        }
        return .success(PasswordHash(iterations: iterations, salt: salt, derivedKey: key))
    }

    /// The string form (standard base64, no padding).
    public var encoded: String {
        func b64(_ bytes: [UInt8]) -> String {
            var s = Data(bytes).base64EncodedString()
            while s.hasSuffix("=") { s.removeLast() }
            return s
        }
        return "\(Self.prefix)\(iterations)$\(b64(salt))$\(b64(derivedKey))"
    }

    static func base64Decode(_ text: String) -> [UInt8]? {
        var s = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while s.hasSuffix("=") { s.removeLast() }
        if s.count % 4 == 1 { return nil }
        s += String(repeating: "=", count: (4 - s.count % 4) % 4)
        return Data(base64Encoded: s).map { Array($0) }
    }
}

public struct PasswordHashError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

extension ConfigReader {
    /// Checks the password credentials of one consumer's plugin entry (a
    /// credential map or a list of them) so a bad hash or iteration count is
    /// refused at load with its path and line, not at the first request.
    func checkPasswordCredentials(_ node: Node, _ path: String) {
        let items: [(Node, String)]
        switch node {
        case .sequence(let sequence): items = sequence.enumerated().map { ($1, "\(path)[\($0)]") }
        case .mapping: items = [(node, path)]
        default: return
        }
        for (item, itemPath) in items {
            guard case .mapping(let mapping) = item else { continue }
            var hashed = false
            for (keyNode, valueNode) in mapping where keyNode.string == "password" {
                let fieldPath = ConfigReader.join(itemPath, "password")
                guard case .scalar(let scalar) = valueNode, !scalar.string.isEmpty else {
                    report(fieldPath, "expected a non-empty string", valueNode); continue
                }
                if PasswordHash.looksHashed(scalar.string) {
                    hashed = true
                    if case .failure(let error) = PasswordHash.parse(scalar.string) { report(fieldPath, error.description, valueNode) }
                }
            }
            for (keyNode, valueNode) in mapping where keyNode.string == "iterations" {
                let fieldPath = ConfigReader.join(itemPath, "iterations")
                let range = PasswordHash.iterationRange
                if hashed {
                    report(fieldPath, "not allowed with a pre-hashed password (the hash carries its iterations)", valueNode)
                } else if !(valueNode.int.map(range.contains) ?? false) {
                    report(fieldPath, "expected an integer in \(range.lowerBound)...\(range.upperBound), got \(describe(valueNode))", valueNode)
                }
            }
        }
    }
}
