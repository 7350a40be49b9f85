import XCTest
@testable import WeirCore

final class ConfigLoaderTests: XCTestCase {
    let fullConfig = """
    listeners:
      - name: web
        listen: 127.0.0.1:8080
        protocol: http
        max_connections: 1000
        limits: { max_request_line: 4k, max_header_bytes: 32k, max_header_count: 50, max_body: 8m, header_timeout: 10s, keepalive_timeout: 1m }
    upstreams:
      - name: orders
        balancer: consistent_hash
        hash_on: header:X-User
        targets:
          - { address: 127.0.0.1:9001, weight: 3 }
          - 127.0.0.1:9002
        health_check:
          active: { path: /healthz, interval: 2s, timeout: 500ms, healthy: 2, unhealthy: 3, healthy_statuses: 200-299 }
          passive: { consecutive_failures: 5, ejection: 30s }
        timeouts: { connect: 1s, read: 30s, write: 30s, request: 1m30s }
        retries: 2
        pool: { max_idle: 16, idle_timeout: 90s, max_requests: 1000 }
    routes:
      - name: orders-api
        match:
          hosts: [API.example.com, "*.example.org"]
          paths: [/orders, "= /orders/special", "~ ^/orders/(\\\\d+)$"]
          methods: [get, POST]
          headers: { X-Version: ["1", "2"], X-Beta: }
        upstream: orders
        preserve_host: true
        max_body: 1m
        plugins:
          - name: key-auth
          - name: rate-limiting
            config: { minute: 100, limit_by: consumer, policy: local }
            enabled: false
    plugins:
      - request-id
    plugin_paths: [plugins, /etc/weir/plugins]
    consumers:
      - name: alice
        groups: [gold]
        credentials: { key-auth: [{ key: alice-key }] }
    admin:
      listen: 127.0.0.1:9901
    workers: 2
    access_log: off
    forwarded: { trusted_proxies: [10.0.0.0/8, "::1/128"] }
    drain_timeout: 15s
    """

    func testParsesEverySection() throws {
        let config = try ConfigLoader.parse(yaml: fullConfig)
        XCTAssertEqual(config.listeners.count, 1)
        let listener = config.listeners[0]
        XCTAssertEqual(listener.name, "web")
        XCTAssertEqual(listener.listen, HostPort(host: "127.0.0.1", port: 8080))
        XCTAssertEqual(listener.maxConnections, 1000)
        XCTAssertEqual(listener.limits.maxRequestLineBytes, 4096)
        XCTAssertEqual(listener.limits.maxHeaderBytes, 32 * 1024)
        XCTAssertEqual(listener.limits.maxHeaderCount, 50)
        XCTAssertEqual(listener.limits.maxBodyBytes, 8 << 20)
        XCTAssertEqual(listener.limits.headerTimeout, .seconds(10))
        XCTAssertEqual(listener.limits.keepAliveTimeout, .seconds(60))

        let upstream = config.upstreams[0]
        XCTAssertEqual(upstream.balancer, .consistentHash)
        XCTAssertEqual(upstream.hashOn, .header("X-User"))
        XCTAssertEqual(upstream.targets, [TargetConfig(address: HostPort(host: "127.0.0.1", port: 9001), weight: 3),
                                          TargetConfig(address: HostPort(host: "127.0.0.1", port: 9002), weight: 1)])
        XCTAssertEqual(upstream.healthCheck.active?.timeout, .milliseconds(500))
        XCTAssertEqual(upstream.healthCheck.active?.healthyStatuses, 200...299)
        XCTAssertEqual(upstream.healthCheck.passive?.consecutiveFailures, 5)
        XCTAssertEqual(upstream.timeouts.request, .seconds(90))
        XCTAssertEqual(upstream.retries, 2)
        XCTAssertEqual(upstream.pool.maxIdle, 16)
        XCTAssertEqual(upstream.pool.maxRequests, 1000)

        let route = config.routes[0]
        XCTAssertEqual(route.match.hosts, ["api.example.com", "*.example.org"])
        XCTAssertEqual(route.match.paths, [.prefix("/orders"), .exact("/orders/special"), .regex("^/orders/(\\d+)$")])
        XCTAssertEqual(route.match.methods, ["GET", "POST"])
        XCTAssertEqual(route.match.headers, [HeaderMatch(name: "X-Version", values: ["1", "2"]), HeaderMatch(name: "X-Beta", values: [])])
        XCTAssertTrue(route.preserveHost)
        XCTAssertEqual(route.maxBodyBytes, 1 << 20)
        XCTAssertEqual(route.plugins.map(\.name), ["key-auth", "rate-limiting"])
        XCTAssertEqual(route.plugins[1].enabled, false)
        XCTAssertEqual(route.plugins[1].config, .map(["minute": .int(100), "limit_by": .string("consumer"), "policy": .string("local")]))

        XCTAssertEqual(config.plugins.map(\.name), ["request-id"])
        XCTAssertEqual(config.pluginPaths, ["plugins", "/etc/weir/plugins"])
        XCTAssertEqual(config.consumers[0].credentials["key-auth"], .array([.map(["key": .string("alice-key")])]))
        XCTAssertEqual(config.admin?.listen.port, 9901)
        XCTAssertEqual(config.workers, 2)
        XCTAssertEqual(config.accessLog, .off)
        XCTAssertEqual(config.forwarded.trustedProxies, ["10.0.0.0/8", "::1/128"])
        XCTAssertEqual(config.drainTimeout, .seconds(15))
    }

    func testDefaultsForMinimalConfig() throws {
        let config = try ConfigLoader.parse(yaml: """
        listeners: [{ name: web, listen: "127.0.0.1:0" }]
        upstreams: [{ name: u, targets: [127.0.0.1:9001] }]
        routes: [{ upstream: u }]
        """)
        XCTAssertEqual(config.listeners[0].listen.port, 0)
        XCTAssertEqual(config.upstreams[0].balancer, .roundRobin)
        XCTAssertEqual(config.routes[0].name, "route-0")
        XCTAssertEqual(config.accessLog, .stdout)
        XCTAssertNil(config.admin)
    }

    /// Every problem is reported at once, each with its path.
    func testReportsEveryProblemWithPaths() {
        let yaml = """
        listeners:
          - name: web
            listen: 127.0.0.1:99999
            protocl: http
        upstreams:
          - name: orders
            balancer: fastest
            targets:
              - { address: 127.0.0.1:9001, weight: 0 }
              - { address: "not a host:80" }
            timeouts: { connect: soon }
          - name: orders
            targets: [127.0.0.1:9003]
        routes:
          - name: a
            match: { paths: [orders, "~ ^/(unclosed"], hosts: ["bad host"] }
            upstream: ordrs
            max_body: lots
        forwarded: { trusted_proxies: [10.0.0.0/33] }
        access_log: stdout
        workers: zero
        """
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: yaml, file: "weir.yaml")) { error in
            guard let errors = error as? ConfigErrors else { return XCTFail("unexpected \(error)") }
            XCTAssertEqual(errors.file, "weir.yaml")
            let paths = Set(errors.issues.map(\.path))
            for expected in [
                "listeners[0].listen", "listeners[0].protocl", "upstreams[0].balancer",
                "upstreams[0].targets[0].weight", "upstreams[0].targets[1].address", "upstreams[0].timeouts.connect",
                "upstreams[1].name", "routes[0].match.paths[0]", "routes[0].match.paths[1]", "routes[0].match.hosts[0]",
                "routes[0].upstream", "routes[0].max_body", "forwarded.trusted_proxies[0]", "workers",
            ] {
                XCTAssertTrue(paths.contains(expected), "missing issue for \(expected); got \(errors.description)")
            }
            let upstreamIssue = errors.issues.first { $0.path == "routes[0].upstream" }
            XCTAssertEqual(upstreamIssue?.message, "unknown upstream \"ordrs\" (did you mean \"orders\"?)")
            XCTAssertTrue(errors.description.contains("routes[0].upstream: unknown upstream \"ordrs\""))
            XCTAssertEqual(upstreamIssue?.line, 17)
            XCTAssertEqual(errors.issues.first { $0.path == "listeners[0].protocl" }?.message, "unknown key (did you mean \"protocol\"?)")
            let lines = errors.issues.compactMap(\.line)
            XCTAssertEqual(lines, lines.sorted(), "issues are listed in file order")
            // Line numbers come from the YAML nodes.
            XCTAssertEqual(errors.issues.first { $0.path == "listeners[0].protocl" }?.line, 4)
            XCTAssertEqual(errors.issues.first { $0.path == "upstreams[0].balancer" }?.line, 7)
        }
    }

    func testMissingRequiredFieldsAndWrongTypes() {
        let yaml = """
        listeners:
          - listen: 127.0.0.1:8080
        upstreams:
          - name: u
            targets: []
            retries: -1
        routes:
          - match: { methods: GET }
            strip_path: maybe
        plugin_paths: { a: b }
        """
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: yaml)) { error in
            let issues = (error as! ConfigErrors).issues
            let byPath = Dictionary(issues.map { ($0.path, $0.message) }, uniquingKeysWith: { a, _ in a })
            XCTAssertEqual(byPath["listeners[0].name"], "required field is missing")
            XCTAssertEqual(byPath["upstreams[0].targets"], "at least one target is required")
            XCTAssertEqual(byPath["upstreams[0].retries"], "must be at least 0, got -1")
            XCTAssertEqual(byPath["routes[0].upstream"], "required field is missing")
            XCTAssertEqual(byPath["routes[0].strip_path"], "expected true or false, got \"maybe\"")
            XCTAssertNotNil(byPath["plugin_paths"])
        }
    }

    func testCrossChecks() {
        let yaml = """
        listeners:
          - { name: a, listen: 127.0.0.1:8080 }
          - { name: a, listen: 127.0.0.1:8080 }
        admin: { listen: 127.0.0.1:8080 }
        upstreams: [{ name: u, targets: [127.0.0.1:1, 127.0.0.1:1] }]
        routes:
          - { name: r1, match: { paths: [/x] }, upstream: u }
          - { name: r2, match: { paths: [/x] }, upstream: u }
          - { name: r2, match: { paths: [/y] }, upstream: u, strip_path: true, rewrite_path: /z }
          - { name: r4, match: { paths: [/w] }, upstream: u, rewrite_path: /items/$1 }
          - { name: r5, match: { paths: [/v, "~ ^/v/(\\\\d+)$"] }, upstream: u, rewrite_path: /items/$1 }
          - { name: r6, match: { paths: ["~ ^/q/(\\\\d+)$"] }, upstream: u, rewrite_path: /items/$2 }
        consumers: [{ name: bob }, { name: bob }]
        """
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: yaml)) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("listeners[1].name: duplicate listener name \"a\""), text)
            XCTAssertTrue(text.contains("listeners[1].listen: address 127.0.0.1:8080 is already used by listeners[0]"), text)
            XCTAssertTrue(text.contains("admin.listen: address 127.0.0.1:8080 is already used"), text)
            XCTAssertTrue(text.contains("upstreams[0].targets[1]: duplicate target 127.0.0.1:1"), text)
            XCTAssertTrue(text.contains("routes[1].match: same match as routes[0]"), text)
            XCTAssertTrue(text.contains("routes[2].name: duplicate route name \"r2\""), text)
            XCTAssertTrue(text.contains("routes[2].rewrite_path: cannot be combined with strip_path"), text)
            XCTAssertTrue(text.contains("routes[3].rewrite_path: refers to $1 but the route has no regex path"), text)
            XCTAssertTrue(text.contains("consumers[1].name: duplicate consumer name \"bob\""), text)
            XCTAssertTrue(text.contains("routes[4].rewrite_path: refers to $1, so every path of the route must be a regex"), text)
            XCTAssertTrue(text.contains("routes[5].rewrite_path: refers to $2 but the route's regex paths have only 1 capture group(s)"), text)
            // Checks that run after reading still point at the line.
            let issues = (error as! ConfigErrors).issues
            XCTAssertEqual(issues.first { $0.path == "routes[1].match" }?.line, 8, text)
            XCTAssertEqual(issues.first { $0.path == "listeners[1].listen" }?.line, 3, text)
        }
    }

    func testAnchorsAliasesAndMergeKeys() throws {
        let config = try ConfigLoader.parse(yaml: """
        listeners: [{ name: web, listen: 127.0.0.1:8080 }]
        upstreams:
          - &base
            name: a
            retries: 3
            timeouts: &timeouts { connect: 2s, read: 10s }
            targets: [127.0.0.1:9001]
          - <<: *base
            name: b
          - name: c
            timeouts: *timeouts
            targets: [127.0.0.1:9002]
        routes: [{ upstream: b }]
        """)
        XCTAssertEqual(config.upstreams[2].timeouts.connect, .seconds(2))
        XCTAssertEqual(config.upstreams.map(\.name), ["a", "b", "c"])
        XCTAssertEqual(config.upstreams[1].retries, 3)
        XCTAssertEqual(config.upstreams[1].targets, config.upstreams[0].targets)
        // A top-level key nobody knows is still an error, anchors or not.
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: """
        defaults: &t { connect: 2s }
        listeners: [{ name: web, listen: 127.0.0.1:8080 }]
        upstreams: [{ name: a, targets: [127.0.0.1:1], timeouts: *t }]
        """)) { error in
            XCTAssertTrue("\(error)".contains("defaults: unknown key"), "\(error)")
        }
    }

    func testNoListenersIsAnError() {
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: "upstreams: []")) { error in
            XCTAssertTrue("\(error)".contains("listeners: at least one listener is required"))
        }
    }

    func testEnvironmentInterpolation() throws {
        let yaml = """
        # ${COMMENTED_OUT} is not substituted
        listeners: [{ name: web, listen: "${HOST}:${PORT:-8080}" }]
        upstreams: [{ name: u, targets: ["${TARGET}"] }]
        routes: [{ upstream: u, match: { paths: ["/price$${x}"] } }]
        """
        let config = try ConfigLoader.parse(yaml: yaml, environment: ["HOST": "127.0.0.2", "TARGET": "10.1.2.3:80"])
        XCTAssertEqual(config.listeners[0].listen, HostPort(host: "127.0.0.2", port: 8080))
        XCTAssertEqual(config.upstreams[0].targets[0].address, HostPort(host: "10.1.2.3", port: 80))
        XCTAssertEqual(config.routes[0].match.paths, [.prefix("/price${x}")])
    }

    func testUnsetEnvironmentVariableReportsLine() {
        let yaml = "listeners:\n  - name: web\n    listen: ${LISTEN_ADDR}\n"
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: yaml, environment: [:])) { error in
            let issue = (error as! ConfigErrors).issues[0]
            XCTAssertEqual(issue.line, 3)
            XCTAssertTrue(issue.message.contains("\"LISTEN_ADDR\" is not set"), issue.message)
        }
    }

    func testYAMLSyntaxErrorHasLine() {
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: "listeners:\n  - name: [web\n")) { error in
            let issue = (error as! ConfigErrors).issues[0]
            XCTAssertTrue(issue.message.hasPrefix("invalid YAML"), issue.message)
            XCTAssertNotNil(issue.line)
        }
    }

    func testLoadFromFile() throws {
        let path = NSTemporaryDirectory() + "weir-core-test-\(UUID().uuidString).yaml"
        try fullConfig.write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let config = try ConfigLoader.load(path: path, environment: [:])
        XCTAssertEqual(config.routes[0].name, "orders-api")
        XCTAssertThrowsError(try ConfigLoader.load(path: path + ".missing")) { error in
            XCTAssertTrue("\(error)".contains("cannot read config file"))
        }
    }

    func testValueParsers() throws {
        XCTAssertEqual(TimeSpan(parsing: "250ms"), .milliseconds(250))
        XCTAssertEqual(TimeSpan(parsing: "2s"), .seconds(2))
        XCTAssertEqual(TimeSpan(parsing: "1m"), .seconds(60))
        XCTAssertEqual(TimeSpan(parsing: "1h"), .seconds(3600))
        XCTAssertEqual(TimeSpan(parsing: "5"), .seconds(5))
        XCTAssertEqual(TimeSpan(parsing: "1.5s"), .milliseconds(1500))
        XCTAssertNil(TimeSpan(parsing: "-1s"))
        XCTAssertNil(TimeSpan(parsing: "2 weeks"))
        XCTAssertEqual(ByteSize.parse("512"), 512)
        XCTAssertEqual(ByteSize.parse("64k"), 65536)
        XCTAssertEqual(ByteSize.parse("8M"), 8 << 20)
        XCTAssertEqual(ByteSize.parse("1g"), 1 << 30)
        XCTAssertNil(ByteSize.parse("1t"))
        XCTAssertEqual(try HostPort.parse("[::1]:8080"), HostPort(host: "::1", port: 8080))
        XCTAssertEqual(try HostPort.parse("example.com:80"), HostPort(host: "example.com", port: 80))
        XCTAssertThrowsError(try HostPort.parse("example.com"))
        XCTAssertThrowsError(try HostPort.parse("::1:80"))
        XCTAssertThrowsError(try HostPort.parse("127.0.0.1:0"))
        XCTAssertNoThrow(try HostPort.parse("127.0.0.1:0", allowPortZero: true))
        let block = try CIDRBlock(parsing: "10.0.0.0/8")
        XCTAssertTrue(block.contains("10.200.3.4"))
        XCTAssertTrue(block.contains("::ffff:10.1.1.1"))
        XCTAssertFalse(block.contains("11.0.0.1"))
        XCTAssertTrue(try CIDRBlock(parsing: "::1").contains("::1"))
        XCTAssertThrowsError(try CIDRBlock(parsing: "10.0.0.0/40"))
        XCTAssertThrowsError(try CIDRBlock(parsing: "banana/8"))
    }

    /// Mangled configs (characters dropped, duplicated or swapped, lines
    /// shuffled) either load or throw ConfigErrors; nothing crashes.
    func testMangledConfigsNeverCrash() {
        var rng = SplitMix64(seed: 99)
        let original = Array(fullConfig.unicodeScalars)
        let alphabet = Array("abz019:-[]{},\"'#&*!|>%@ \n\t.~$/".unicodeScalars)
        for _ in 0..<1500 {
            var text = original
            for _ in 0..<(1 + Int(rng.next(below: 6))) {
                let position = Int(rng.next(below: UInt64(text.count)))
                switch rng.next(below: 3) {
                case 0: text.remove(at: position)
                case 1: text.insert(alphabet[Int(rng.next(below: UInt64(alphabet.count)))], at: position)
                default: text.swapAt(position, Int(rng.next(below: UInt64(text.count))))
                }
            }
            var string = ""
            string.unicodeScalars.append(contentsOf: text)
            do {
                _ = try ConfigLoader.parse(yaml: string, environment: ["X": "1"])
            } catch let errors as ConfigErrors {
                XCTAssertFalse(errors.issues.isEmpty)
            } catch {
                XCTFail("unexpected error type \(error)")
            }
        }
        for value in ["1e300", "nan", "inf", "-0.5", "99999999999999999999h", "1e-30"] {
            _ = TimeSpan(parsing: value)
        }
        XCTAssertNil(TimeSpan(parsing: "1e300"))
    }

    func testRedactedYAMLHidesSecrets() throws {
        var config = try ConfigLoader.parse(yaml: fullConfig)
        config.plugins.append(PluginRef(name: "jwt", config: .map([
            "secret": .string("s3cr3t"), "key_names": .array([.string("apikey")]),
            "upstream_auth": .map(["password": .string("hunter2"), "user": .string("svc")]),
        ])))
        let yaml = redactedYAML(config)
        XCTAssertFalse(yaml.contains("alice-key"), yaml)
        XCTAssertFalse(yaml.contains("s3cr3t"), yaml)
        XCTAssertFalse(yaml.contains("hunter2"), yaml)
        XCTAssertTrue(yaml.contains("<redacted>"))
        XCTAssertTrue(yaml.contains("apikey"), "non-secret settings stay visible")
        XCTAssertTrue(yaml.contains("svc"))
        XCTAssertTrue(yaml.contains("orders-api"))
        XCTAssertTrue(yaml.contains("hash_on: header:X-User"), yaml)
        // The rendering is itself a loadable config (with secrets replaced).
        let reparsed = try ConfigLoader.parse(yaml: yaml)
        XCTAssertEqual(reparsed.routes, config.routes)
        XCTAssertEqual(reparsed.upstreams, config.upstreams)
        XCTAssertEqual(reparsed.listeners, config.listeners)
    }
}
