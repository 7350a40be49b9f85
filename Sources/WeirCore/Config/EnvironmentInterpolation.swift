// `${VAR}` and `${VAR:-default}` substitution, done on the raw text before
// YAML parsing so a variable can supply any scalar. `$${` writes a literal
// `${`. Comment lines are left alone so a commented-out reference to an
// unset variable is not an error.

enum EnvironmentInterpolation {
    static func interpolate(_ text: String, environment: [String: String]) -> (String, [ConfigIssue]) {
        // Most configs reference no variable; the line-by-line copy below was
        // 11% of loading a config with 100,000 consumers (bench/consumers).
        // Without any "${" the output is the text itself.
        if !containsReference(text) { return (text, []) }
        var output = ""
        output.reserveCapacity(text.utf8.count)
        var issues: [ConfigIssue] = []
        var lineNumber = 0
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            if lineNumber > 1 { output += "\n" }
            let trimmed = line.drop { $0 == " " || $0 == "\t" }
            if trimmed.hasPrefix("#") || !line.contains("$") {
                output += line
                continue
            }
            output += interpolateLine(line, line: lineNumber, environment: environment, issues: &issues)
        }
        return (output, issues)
    }

    private static func containsReference(_ text: String) -> Bool {
        var previousWasDollar = false
        for byte in text.utf8 {
            if previousWasDollar && byte == UInt8(ascii: "{") { return true }
            previousWasDollar = byte == UInt8(ascii: "$")
        }
        return false
    }

    private static func interpolateLine(_ line: Substring, line number: Int, environment: [String: String],
                                        issues: inout [ConfigIssue]) -> String {
        var result = ""
        var rest = line[...]
        while let dollar = rest.firstIndex(of: "$") {
            result += rest[..<dollar]
            let afterDollar = rest[rest.index(after: dollar)...]
            if afterDollar.hasPrefix("${") {            // `$${` -> literal `${`
                result += "${"
                rest = afterDollar.dropFirst(2)
                continue
            }
            guard afterDollar.hasPrefix("{") else {
                result += "$"
                rest = afterDollar
                continue
            }
            guard let close = afterDollar.firstIndex(of: "}") else {
                issues.append(ConfigIssue(path: "", message: "unterminated \"${\" in environment reference", line: number))
                result += rest[dollar...]
                return result
            }
            let body = afterDollar[afterDollar.index(after: afterDollar.startIndex)..<close]
            let name: Substring
            let fallback: Substring?
            if let separator = body.range(of: ":-") {
                name = body[..<separator.lowerBound]
                fallback = body[separator.upperBound...]
            } else {
                name = body
                fallback = nil
            }
            if !isValidName(name) {
                issues.append(ConfigIssue(path: "", message: "invalid environment variable name \"\(name)\" in \"${\(body)}\"", line: number))
            } else if let value = environment[String(name)], !(value.isEmpty && fallback != nil) {
                result += value
            } else if let fallback = fallback {
                result += fallback
            } else {
                issues.append(ConfigIssue(path: "", message: "environment variable \"\(name)\" is not set (use ${\(name):-default} for a default)", line: number))
            }
            rest = afterDollar[afterDollar.index(after: close)...]
        }
        result += rest
        return result
    }

    private static func isValidName(_ name: Substring) -> Bool {
        guard let first = name.unicodeScalars.first, first == "_" || ("A"..."Z").contains(first) || ("a"..."z").contains(first) else {
            return false
        }
        return name.unicodeScalars.allSatisfy { $0 == "_" || ("A"..."Z").contains($0) || ("a"..."z").contains($0) || ("0"..."9").contains($0) }
    }
}
