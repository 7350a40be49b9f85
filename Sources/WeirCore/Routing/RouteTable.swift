// The compiled route table: built once per config, then read concurrently
// by every event loop.
//
// Which route wins ("most specific"), in this order:
//   1. Host: an exact host beats a wildcard (`*.example.com`; a longer
//      suffix beats a shorter one), which beats a route with no hosts. The
//      request's host is tried against each level in turn, so a request
//      for a host with no matching route falls back to wildcard, then
//      host-less routes (like Kong; nginx picks the server block first).
//   2. Path, within the same host level: exact (`= /x`) beats regex
//      (`~ ...`), which beats prefix; among prefixes the longest wins.
//      A route with no paths behaves as the prefix `/`.
//   3. Conditions: with the same host and path, a route with more
//      conditions (methods counts as one, each header as one) wins.
//   4. Declared order breaks any remaining tie (the earlier route wins);
//      among regexes at the same level the earlier one wins, as in nginx.
//
// Prefixes match on segment boundaries: `/orders` matches `/orders` and
// `/orders/1` but not `/ordersx`; a prefix ending in `/` (`/api/`) matches
// anything that starts with it.
//
// How it is fast: hosts are looked up in a hash table (exact) and a table
// of wildcard suffixes; each host level holds hash tables of exact paths
// and of prefixes. The request path is hashed once, left to right, and the
// hash at each `/` gives the candidate prefixes, longest first, each a
// single probe. Regexes are indexed by their literal leading part (up to
// its last `/`), so `~ ^/orders/\d+$` is only tried for paths under
// `/orders/`; unanchored regexes are tried for every path at their level.

import Foundation

/// Header access for matching; names are passed lower-cased.
public protocol RouteHeaderLookup {
    func firstValue(forLowercasedName name: String) -> String?
}

/// A dictionary whose keys are already lower-cased header names.
extension Dictionary: RouteHeaderLookup where Key == String, Value == String {
    public func firstValue(forLowercasedName name: String) -> String? { self[name] }
}

/// Where a matched route sends the request's path.
public enum ForwardPath: Equatable, Sendable {
    /// The path as the request has it (no strip_path / rewrite_path change).
    case asReceived
    /// Another path (strip_path, rewrite_path); may equal the received one.
    case rewritten(String)
}

public struct RouteMatch: Sendable {
    public let routeIndex: Int
    public let route: RouteConfig
    /// Path after strip_path / rewrite_path, query not included.
    public let forwardPath: String

    public init(routeIndex: Int, route: RouteConfig, forwardPath: String) {
        self.routeIndex = routeIndex
        self.route = route
        self.forwardPath = forwardPath
    }
}

public final class RouteTable: @unchecked Sendable {
    // @unchecked: all stored state is immutable after init; the only
    // reference types inside are NSRegularExpression, which is documented
    // as safe to use from several threads.

    public let routes: [RouteConfig]
    private let conditions: [RouteConditions]
    private let exactHosts: ByteKeyTable       // host -> bucket index
    private let wildcardHosts: ByteKeyTable    // ".example.com" -> bucket index
    private let buckets: [HostBucket]
    private let anyHostBucket: Int?

    public init(routes: [RouteConfig]) throws {
        self.routes = routes
        var issues: [ConfigIssue] = []
        var builders: [String: HostBucketBuilder] = [:]   // key: "=host", "*.suffix" or "" (any host)
        var conditions: [RouteConditions] = []

        for (routeIndex, route) in routes.enumerated() {
            conditions.append(RouteConditions(route.match))
            var compiledPaths: [CompiledPath] = []
            let patterns = route.match.paths.isEmpty ? [PathPattern.prefix("/")] : route.match.paths
            for (pathIndex, pattern) in patterns.enumerated() {
                switch pattern {
                case .exact(let path): compiledPaths.append(.exact(Array(path.utf8)))
                case .prefix(let path): compiledPaths.append(.prefix(Array(path.utf8)))
                case .regex(let source):
                    do {
                        let regex = try NSRegularExpression(pattern: source)
                        compiledPaths.append(.regex(regex, indexKey: RegexIndexing.literalDirectory(of: source)))
                    } catch {
                        issues.append(ConfigIssue(path: "routes[\(routeIndex)].match.paths[\(pathIndex)]",
                                                  message: "invalid regex \"\(source)\": \(error.localizedDescription)"))
                    }
                }
            }
            let hostKeys = route.match.hosts.isEmpty ? [""] : route.match.hosts.map { host -> String in
                let lower = host.lowercased()
                return lower.hasPrefix("*.") ? "*" + lower.dropFirst(1) : "=" + lower
            }
            for hostKey in Set(hostKeys) {
                for path in compiledPaths {
                    builders[hostKey, default: HostBucketBuilder()].add(route: routeIndex, path: path)
                }
            }
        }
        if !issues.isEmpty { throw ConfigErrors(file: "<routes>", issues: issues) }

        self.conditions = conditions
        var buckets: [HostBucket] = []
        var exactEntries: [(key: [UInt8], values: Range<Int>)] = []
        var wildcardEntries: [(key: [UInt8], values: Range<Int>)] = []
        var anyHostBucket: Int?
        for (key, builder) in builders.sorted(by: { $0.key < $1.key }) {
            let index = buckets.count
            buckets.append(builder.build(conditions: conditions))
            if key.isEmpty {
                anyHostBucket = index
            } else if key.hasPrefix("*") {
                wildcardEntries.append((Array(key.utf8.dropFirst()), index..<(index + 1)))   // ".example.com"
            } else {
                exactEntries.append((Array(key.utf8.dropFirst()), index..<(index + 1)))
            }
        }
        self.buckets = buckets
        self.exactHosts = ByteKeyTable(entries: exactEntries)
        self.wildcardHosts = ByteKeyTable(entries: wildcardEntries)
        self.anyHostBucket = anyHostBucket
    }

    /// host may include ":port" (ignored); host matching is case-insensitive. path excludes the query string.
    public func match<H: RouteHeaderLookup>(method: String, host: String, path: String, headers: H) -> RouteMatch? {
        guard let (index, forwardPath) = matchIndex(method: method, host: host, path: path, headers: headers) else { return nil }
        return RouteMatch(routeIndex: index, route: routes[index], forwardPath: forwardPath)
    }

    /// `match` without copying the matched `RouteConfig` out (a struct of
    /// arrays and strings: a dozen retains and releases per request). The
    /// data path keeps its own per-route objects, indexed like `routes`.
    public func matchIndex<H: RouteHeaderLookup>(method: String, host: String, path: String,
                                                 headers: H) -> (routeIndex: Int, forwardPath: String)? {
        var path = path
        // Inner layers pass a small `Found` through their closures.
        var found: Found?
        if path.utf8.withContiguousStorageIfAvailable({ pathBytes in
            found = matchContiguous(method: method, host: host, path: path, pathBytes: pathBytes, headers: headers)
        }) == nil {
            // Bridged or lazily-built strings: make the bytes contiguous once.
            path.makeContiguousUTF8()
            _ = path.utf8.withContiguousStorageIfAvailable { pathBytes in
                found = matchContiguous(method: method, host: host, path: path, pathBytes: pathBytes, headers: headers)
            }
        }
        guard let found = found else { return nil }
        switch found.forwardPath {
        case .asReceived: return (found.route, path)
        case .rewritten(let forward): return (found.route, forward)
        }
    }

    /// `matchIndex` for a path the caller has as bytes (a request target
    /// read in place): no String is made of it unless a regex is tried or
    /// strip_path / rewrite_path computes a new one.
    public func matchIndex<H: RouteHeaderLookup>(method: String, host: String, pathBytes: UnsafeBufferPointer<UInt8>,
                                                 headers: H) -> (routeIndex: Int, forwardPath: ForwardPath)? {
        guard let found = matchContiguous(method: method, host: host, path: nil, pathBytes: pathBytes, headers: headers) else {
            return nil
        }
        return (found.route, found.forwardPath)
    }

    /// `path`: the path as a String when the caller has one (else made
    /// from `pathBytes` where a String is needed: `RequestView.path`).
    private func matchContiguous<H: RouteHeaderLookup>(method: String, host: String, path: String?,
                                                       pathBytes: UnsafeBufferPointer<UInt8>, headers: H) -> Found? {
        // Hash every candidate prefix of the path once: at each '/' the
        // prefix before it (`/orders` style) and the prefix including it
        // (`/orders/` style), and the full path. Stored longest first.
        var slashCount = 0
        for byte in pathBytes where byte == UInt8(ascii: "/") { slashCount += 1 }
        return withUnsafeTemporaryAllocation(of: PrefixProbe.self, capacity: 2 * slashCount + 1) { probes in
            var count = 0
            var hash = FNV1a.offsetBasis
            for (offset, byte) in pathBytes.enumerated() {
                if byte == UInt8(ascii: "/") {
                    if offset > 0 { probes[count] = PrefixProbe(hash: hash, length: offset); count += 1 }
                    hash = FNV1a.step(hash, byte)
                    if offset + 1 < pathBytes.count { probes[count] = PrefixProbe(hash: hash, length: offset + 1); count += 1 }
                } else {
                    hash = FNV1a.step(hash, byte)
                }
            }
            let fullHash = hash
            let request = RequestView(method: method, knownPath: path, pathBytes: pathBytes, fullHash: fullHash,
                                      probes: UnsafeBufferPointer(rebasing: probes[0..<count]))
            return withHostBuckets(host) { bucketIndex in
                matchInBucket(buckets[bucketIndex], request, headers)
            }
        }
    }

    /// Calls `body` for the request host's buckets from most to least
    /// specific until it returns a match.
    private func withHostBuckets(_ rawHost: String, _ body: (Int) -> Found?) -> Found? {
        // No route names a host: the host does not take part (not even read).
        if exactHosts.isEmpty && wildcardHosts.isEmpty { return anyHostBucket.flatMap(body) }
        var host = rawHost
        var found: Found?
        if host.utf8.withContiguousStorageIfAvailable({ found = hostLevels($0, body) }) == nil {
            host.makeContiguousUTF8()
            _ = host.utf8.withContiguousStorageIfAvailable { found = hostLevels($0, body) }
        }
        return found
    }

    private func hostLevels(_ raw: UnsafeBufferPointer<UInt8>, _ body: (Int) -> Found?) -> Found? {
        let length = HostNormalization.nameLength(raw)
        if length > 0 && length <= 255 && !(exactHosts.isEmpty && wildcardHosts.isEmpty) {
            let result: Found?? = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: length) { lower in
                var hash = FNV1a.offsetBasis
                for index in 0..<length {
                    let byte = HostNormalization.lowercase(raw[index])
                    lower[index] = byte
                    hash = FNV1a.step(hash, byte)
                }
                let name = UnsafeBufferPointer(lower)
                if let range = exactHosts.find(hash: hash, bytes: name, length: length),
                   let match = body(range.lowerBound) {
                    return .some(match)
                }
                // Wildcard suffixes, longest first: ".b.example.com", ".example.com", ".com".
                if !wildcardHosts.isEmpty {
                    for start in 1..<length where name[start] == UInt8(ascii: ".") {
                        let suffixLength = length - start
                        guard wildcardHosts.mayContain(length: suffixLength) else { continue }
                        let suffix = UnsafeBufferPointer(rebasing: name[start...])
                        if let range = wildcardHosts.find(hash: FNV1a.hash(suffix), bytes: suffix, length: suffixLength),
                           let match = body(range.lowerBound) {
                            return .some(match)
                        }
                    }
                }
                return .none
            }
            if case .some(let match) = result { return match }
        }
        if let any = anyHostBucket { return body(any) }
        return nil
    }

    private func matchInBucket<H: RouteHeaderLookup>(_ bucket: HostBucket, _ request: RequestView, _ headers: H) -> Found? {
        // 1. Exact paths.
        if let range = bucket.exactPaths.find(hash: request.fullHash, bytes: request.pathBytes, length: request.pathBytes.count) {
            for index in range where conditionsMatch(bucket.pathCandidates[index], request, headers) {
                let candidate = bucket.pathCandidates[index]
                return makeMatch(candidate.route, forwardPath: forwardPathForExact(candidate.route))
            }
        }
        // 2. Regexes: indexed ones whose literal directory prefixes the path, then unanchored ones.
        if !bucket.regexCandidates.isEmpty {
            var best: (candidate: RegexCandidate, result: NSTextCheckingResult)?
            func consider(_ range: Range<Int>) {
                for candidate in bucket.regexCandidates[range] {
                    if let current = best?.candidate, !candidate.outranks(current) { break }   // groups are sorted
                    guard conditions[candidate.route].matches(request.method, headers) else { continue }
                    // NSRegularExpression ranges count UTF-16 code units.
                    let path = request.path
                    let nsRange = NSRange(location: 0, length: path.utf16.count)
                    if let result = candidate.regex.firstMatch(in: path, options: [], range: nsRange) {
                        best = (candidate, result)
                        break
                    }
                }
            }
            if let range = bucket.regexIndex.find(hash: request.fullHash, bytes: request.pathBytes, length: request.pathBytes.count) {
                consider(range)
            }
            for probe in request.probes {
                if let range = bucket.regexIndex.find(hash: probe.hash, bytes: request.pathBytes, length: probe.length) {
                    consider(range)
                }
            }
            if !bucket.unindexedRegexes.isEmpty { consider(bucket.unindexedRegexes) }
            if let best = best {
                return makeMatch(best.candidate.route, forwardPath: forwardPathForRegex(best.candidate.route, request.path, best.result))
            }
        }
        // 3. Prefixes, longest first: the full path, then each probe.
        if let range = bucket.prefixPaths.find(hash: request.fullHash, bytes: request.pathBytes, length: request.pathBytes.count) {
            for index in range where conditionsMatch(bucket.pathCandidates[index], request, headers) {
                let candidate = bucket.pathCandidates[index]
                return makeMatch(candidate.route, forwardPath: forwardPathForPrefix(candidate.route, request.pathBytes, prefixLength: request.pathBytes.count))
            }
        }
        for probe in request.probes.reversed() {
            if let range = bucket.prefixPaths.find(hash: probe.hash, bytes: request.pathBytes, length: probe.length) {
                for index in range where conditionsMatch(bucket.pathCandidates[index], request, headers) {
                    let candidate = bucket.pathCandidates[index]
                    return makeMatch(candidate.route, forwardPath: forwardPathForPrefix(candidate.route, request.pathBytes, prefixLength: probe.length))
                }
            }
        }
        return nil
    }

    /// Most routes have no method/header conditions: skip the lookup then.
    @inline(__always)
    private func conditionsMatch<H: RouteHeaderLookup>(_ candidate: PathCandidate, _ request: RequestView, _ headers: H) -> Bool {
        candidate.conditionCount == 0 || conditions[candidate.route].matches(request.method, headers)
    }

    // MARK: Forward path

    private func makeMatch(_ routeIndex: Int, forwardPath: ForwardPath) -> Found {
        Found(route: routeIndex, forwardPath: forwardPath)
    }

    private func forwardPathForExact(_ routeIndex: Int) -> ForwardPath {
        let route = routes[routeIndex]
        if let rewrite = route.rewritePath { return .rewritten(rewrite) }
        return route.stripPath ? .rewritten("/") : .asReceived
    }

    private func forwardPathForPrefix(_ routeIndex: Int, _ pathBytes: UnsafeBufferPointer<UInt8>, prefixLength: Int) -> ForwardPath {
        let route = routes[routeIndex]
        if let rewrite = route.rewritePath { return .rewritten(rewrite) }
        guard route.stripPath else { return .asReceived }
        let rest = UnsafeBufferPointer(rebasing: pathBytes[prefixLength...])
        if rest.first == UInt8(ascii: "/") { return .rewritten(String(decoding: rest, as: UTF8.self)) }
        return .rewritten("/" + String(decoding: rest, as: UTF8.self))
    }

    private func forwardPathForRegex(_ routeIndex: Int, _ path: String, _ result: NSTextCheckingResult) -> ForwardPath {
        let route = routes[routeIndex]
        if let rewrite = route.rewritePath { return .rewritten(RouteRewrite.expand(rewrite, captures: result, in: path)) }
        guard route.stripPath, result.range.location == 0 else { return .asReceived }
        let rest = (path as NSString).substring(from: result.range.length)
        return .rewritten(rest.hasPrefix("/") ? rest : "/" + rest)
    }
}

// MARK: - Building blocks

/// The winning route and its forward path: small, so it passes cheaply
/// through the closure layers of a lookup.
struct Found {
    var route: Int
    var forwardPath: ForwardPath
}

struct PrefixProbe {
    var hash: UInt64
    var length: Int
}

struct RequestView {
    let method: String
    /// The path as a String when the caller had one.
    let knownPath: String?
    let pathBytes: UnsafeBufferPointer<UInt8>
    let fullHash: UInt64
    let probes: UnsafeBufferPointer<PrefixProbe>

    /// The path as a String (regexes and their rewrites): made from the
    /// bytes when the caller routed by bytes.
    var path: String { knownPath ?? String(decoding: pathBytes, as: UTF8.self) }
}

/// Method and header conditions of one route.
struct RouteConditions {
    let methods: [String]
    let headers: [(name: String, values: [String])]
    /// Specificity: methods count as one condition, each header as one.
    let count: Int

    init(_ match: RouteMatchConfig) {
        methods = match.methods.map { $0.uppercased() }
        headers = match.headers.map { ($0.name.lowercased(), $0.values) }
        count = (methods.isEmpty ? 0 : 1) + headers.count
    }

    @inline(__always)
    func matches<H: RouteHeaderLookup>(_ method: String, _ lookup: H) -> Bool {
        if !methods.isEmpty && !methods.contains(method) { return false }
        for header in headers {
            guard let value = lookup.firstValue(forLowercasedName: header.name) else { return false }
            if !header.values.isEmpty && !header.values.contains(value) { return false }
        }
        return true
    }
}

enum CompiledPath {
    case exact([UInt8])
    case prefix([UInt8])
    /// `indexKey`: the regex's literal leading directory (ends in `/`), or nil if it has none.
    case regex(NSRegularExpression, indexKey: [UInt8]?)
}

struct PathCandidate {
    let route: Int
    let conditionCount: Int
}

struct RegexCandidate {
    let route: Int
    let conditionCount: Int
    let regex: NSRegularExpression

    /// Higher rank wins: more conditions, then earlier declaration.
    func outranks(_ other: RegexCandidate) -> Bool {
        conditionCount != other.conditionCount ? conditionCount > other.conditionCount : route < other.route
    }
}

final class HostBucket {
    let exactPaths: ByteKeyTable
    let prefixPaths: ByteKeyTable
    let pathCandidates: [PathCandidate]
    let regexIndex: ByteKeyTable
    let regexCandidates: [RegexCandidate]
    let unindexedRegexes: Range<Int>

    init(exactPaths: ByteKeyTable, prefixPaths: ByteKeyTable, pathCandidates: [PathCandidate],
         regexIndex: ByteKeyTable, regexCandidates: [RegexCandidate], unindexedRegexes: Range<Int>) {
        self.exactPaths = exactPaths
        self.prefixPaths = prefixPaths
        self.pathCandidates = pathCandidates
        self.regexIndex = regexIndex
        self.regexCandidates = regexCandidates
        self.unindexedRegexes = unindexedRegexes
    }
}

struct HostBucketBuilder {
    private var exact: [[UInt8]: [Int]] = [:]
    private var prefix: [[UInt8]: [Int]] = [:]
    private var regexByKey: [[UInt8]: [(Int, NSRegularExpression)]] = [:]
    private var unindexed: [(Int, NSRegularExpression)] = []

    mutating func add(route: Int, path: CompiledPath) {
        switch path {
        case .exact(let bytes): exact[bytes, default: []].append(route)
        case .prefix(let bytes): prefix[bytes, default: []].append(route)
        case .regex(let regex, let key):
            if let key = key { regexByKey[key, default: []].append((route, regex)) } else { unindexed.append((route, regex)) }
        }
    }

    func build(conditions: [RouteConditions]) -> HostBucket {
        var candidates: [PathCandidate] = []
        func group(_ map: [[UInt8]: [Int]]) -> ByteKeyTable {
            var entries: [(key: [UInt8], values: Range<Int>)] = []
            for (key, routes) in map {
                let start = candidates.count
                let sorted = Set(routes).map { PathCandidate(route: $0, conditionCount: conditions[$0].count) }
                    .sorted { $0.conditionCount != $1.conditionCount ? $0.conditionCount > $1.conditionCount : $0.route < $1.route }
                candidates += sorted
                entries.append((key, start..<candidates.count))
            }
            return ByteKeyTable(entries: entries)
        }
        let exactTable = group(exact)
        let prefixTable = group(prefix)

        var regexCandidates: [RegexCandidate] = []
        func sortedRegexes(_ list: [(Int, NSRegularExpression)]) -> [RegexCandidate] {
            list.map { RegexCandidate(route: $0.0, conditionCount: conditions[$0.0].count, regex: $0.1) }
                .sorted { $0.outranks($1) }
        }
        var regexEntries: [(key: [UInt8], values: Range<Int>)] = []
        for (key, list) in regexByKey {
            let start = regexCandidates.count
            regexCandidates += sortedRegexes(list)
            regexEntries.append((key, start..<regexCandidates.count))
        }
        let unindexedStart = regexCandidates.count
        regexCandidates += sortedRegexes(unindexed)
        return HostBucket(exactPaths: exactTable, prefixPaths: prefixTable, pathCandidates: candidates,
                          regexIndex: ByteKeyTable(entries: regexEntries), regexCandidates: regexCandidates,
                          unindexedRegexes: unindexedStart..<regexCandidates.count)
    }
}

enum HostNormalization {
    /// Length of the host name without `:port` and without a trailing dot.
    /// `[v6]:port` keeps the brackets.
    static func nameLength(_ bytes: UnsafeBufferPointer<UInt8>) -> Int {
        var length = bytes.count
        if bytes.first == UInt8(ascii: "[") {
            if let close = bytes.firstIndex(of: UInt8(ascii: "]")) { length = close + 1 }
        } else if let colon = bytes.firstIndex(of: UInt8(ascii: ":")) {
            length = colon
        }
        if length > 0 && bytes[length - 1] == UInt8(ascii: ".") { length -= 1 }
        return length
    }

    @inline(__always)
    static func lowercase(_ byte: UInt8) -> UInt8 {
        byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
    }
}

enum RegexIndexing {
    /// The literal directory a `^`-anchored regex requires every match to
    /// start with, cut at its last `/`: `^/orders/\d+$` -> `/orders/`.
    /// nil when there is no safe literal (unanchored, alternation, flags).
    static func literalDirectory(of source: String) -> [UInt8]? {
        guard source.hasPrefix("^"), !source.contains("|") else { return nil }
        let metacharacters = Set(".^$*+?()[]{}|\\".utf8)
        var literal: [UInt8] = []
        var bytes = Array(source.utf8.dropFirst())[...]
        while let byte = bytes.first, !metacharacters.contains(byte) {
            literal.append(byte)
            bytes = bytes.dropFirst()
        }
        // A quantifier after the literal applies to its last character.
        if let next = bytes.first, next == UInt8(ascii: "?") || next == UInt8(ascii: "*") || next == UInt8(ascii: "{") {
            literal.removeLast(min(1, literal.count))
        }
        guard let lastSlash = literal.lastIndex(of: UInt8(ascii: "/")) else { return nil }
        return Array(literal[...lastSlash])
    }
}

/// `$1`..`$9` substitution for `rewrite_path` on regex routes.
public enum RouteRewrite {
    /// The capture numbers a template refers to.
    public static func captureReferences(in template: String) -> [Int] {
        var result: [Int] = []
        var previousWasDollar = false
        for scalar in template.unicodeScalars {
            if previousWasDollar, let digit = Int(String(scalar)), digit >= 1 { result.append(digit) }
            previousWasDollar = scalar == "$"
        }
        return result
    }

    static func expand(_ template: String, captures: NSTextCheckingResult, in path: String) -> String {
        var output = ""
        var previousWasDollar = false
        let source = path as NSString
        for scalar in template.unicodeScalars {
            if previousWasDollar {
                previousWasDollar = false
                if let digit = Int(String(scalar)), digit >= 1 {
                    if digit < captures.numberOfRanges {
                        let range = captures.range(at: digit)
                        if range.location != NSNotFound { output += source.substring(with: range) }
                    }
                    continue
                }
                output += "$"
            }
            if scalar == "$" { previousWasDollar = true } else { output.unicodeScalars.append(scalar) }
        }
        if previousWasDollar { output += "$" }
        return output
    }
}
