// Config of tcp/tls listeners: the keys, their defaults, and every
// problem reported with its config path and YAML line.

import WeirCore
import XCTest

final class StreamListenerConfigTests: XCTestCase {
    private func issues(_ yaml: String) -> [ConfigIssue] {
        do {
            _ = try ConfigLoader.parse(yaml: yaml)
            XCTFail("expected config errors")
            return []
        } catch let errors as ConfigErrors {
            return errors.issues
        } catch {
            XCTFail("unexpected \(error)")
            return []
        }
    }

    func testParsesTCPAndTLSListeners() throws {
        let config = try ConfigLoader.parse(yaml: """
        listeners:
          - name: redis
            listen: 127.0.0.1:6380
            protocol: tcp
            upstream: cache
            idle_timeout: 90s
            connect_timeout: 250ms
            max_connections: 100
            plugins:
              - name: tcp-guard
                config: { allow: [10.0.0.0/8] }
          - name: edge
            listen: 127.0.0.1:8443
            protocol: tls
            upstream: cache
            sni_routes:
              - { server_names: [API.example.com, "*.apps.example.com"], upstream: api }
            client_hello_timeout: 2s
            max_client_hello: 8k
        upstreams:
          - { name: cache, targets: [127.0.0.1:6379] }
          - { name: api, targets: [127.0.0.1:9443] }
        """)
        let tcp = config.listeners[0]
        XCTAssertEqual(tcp.protocol, .tcp)
        XCTAssertEqual(tcp.upstream, "cache")
        XCTAssertEqual(tcp.stream.idleTimeout, .seconds(90))
        XCTAssertEqual(tcp.stream.connectTimeout, .milliseconds(250))
        XCTAssertEqual(tcp.maxConnections, 100)
        XCTAssertEqual(tcp.plugins.map(\.name), ["tcp-guard"])
        let tls = config.listeners[1]
        XCTAssertEqual(tls.sniRoutes, [SNIRoute(serverNames: ["api.example.com", "*.apps.example.com"], upstream: "api")])
        XCTAssertEqual(tls.stream.clientHelloTimeout, .seconds(2))
        XCTAssertEqual(tls.stream.maxClientHelloBytes, 8 * 1024)
        XCTAssertEqual(tls.stream.idleTimeout, .seconds(600), "default")

        // GET /config renders it back; the rendering loads to the same config.
        XCTAssertEqual(try ConfigLoader.parse(yaml: config.redactedYAML()), config)
    }

    func testStreamKeysOnHTTPListenerAndTLSKeysOnTCPListener() {
        let found = issues("""
        listeners:
          - name: web
            listen: 127.0.0.1:8080
            upstream: cache
            idle_timeout: 5s
          - name: raw
            listen: 127.0.0.1:8081
            protocol: tcp
            upstream: cache
            sni_routes: [{ server_names: [a.example.com], upstream: cache }]
        upstreams:
          - { name: cache, targets: [127.0.0.1:6379] }
        """)
        let byPath = Dictionary(found.map { ($0.path, $0) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(byPath["listeners[0].upstream"]?.message, "only applies to tcp and tls listeners (this one is http)")
        XCTAssertEqual(byPath["listeners[0].upstream"]?.line, 4)
        XCTAssertEqual(byPath["listeners[0].idle_timeout"]?.line, 5)
        XCTAssertEqual(byPath["listeners[1].sni_routes"]?.message, "only applies to tls listeners (this one is tcp)")
        XCTAssertEqual(byPath["listeners[1].sni_routes"]?.line, 10)
    }

    func testReferencesAndRoutingProblems() {
        let found = issues("""
        listeners:
          - name: a
            listen: 127.0.0.1:7001
            protocol: tcp
          - name: b
            listen: 127.0.0.1:7002
            protocol: tls
            upstream: cahce
            sni_routes:
              - server_names: [x.example.com, "bad name", "*.example.com"]
                upstream: api
              - server_names: [x.example.com]
                upstream: nope
            max_client_hello: 1m
        upstreams:
          - { name: cache, targets: [127.0.0.1:6379] }
          - { name: api, targets: [127.0.0.1:9443] }
        """)
        let byPath = Dictionary(found.map { ($0.path, $0) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(byPath["listeners[0]"]?.message,
                       "a tcp listener needs `upstream` (or plugins that choose one with weir.upstream.set_upstream)")
        XCTAssertEqual(byPath["listeners[1].upstream"]?.message, "unknown upstream \"cahce\" (did you mean \"cache\"?)")
        XCTAssertEqual(byPath["listeners[1].upstream"]?.line, 8)
        XCTAssertNotNil(byPath["listeners[1].sni_routes[0].server_names[1]"], "invalid name")
        XCTAssertEqual(byPath["listeners[1].sni_routes[1].server_names[0]"]?.message,
                       "server name \"x.example.com\" is already routed by listeners[1].sni_routes[0]")
        XCTAssertEqual(byPath["listeners[1].sni_routes[1].upstream"]?.message, "unknown upstream \"nope\"")
        XCTAssertEqual(byPath["listeners[1].sni_routes[1].upstream"]?.line, 13)
        XCTAssertEqual(byPath["listeners[1].max_client_hello"]?.message, "must be at most 64k")
    }

    func testActiveCheckTypeDefaultsToTCPForUpstreamsOnlyL4ListenersUse() throws {
        let config = try ConfigLoader.parse(yaml: """
        listeners:
          - { name: web, listen: 127.0.0.1:8080 }
          - { name: raw, listen: 127.0.0.1:6380, protocol: tcp, upstream: cache }
        upstreams:
          - name: cache
            targets: [127.0.0.1:6379]
            health_check: { active: { interval: 1s } }
          - name: api
            targets: [127.0.0.1:9000]
            health_check: { active: { interval: 1s } }
          - name: both
            targets: [127.0.0.1:9001]
            health_check: { active: { type: http, interval: 1s } }
        routes:
          - { name: r, upstream: api }
        """)
        XCTAssertEqual(config.upstreams.map { $0.healthCheck.active?.type }, [.tcp, .http, .http])
        XCTAssertEqual(try ConfigLoader.parse(yaml: config.redactedYAML()), config)

        let found = issues("""
        listeners:
          - { name: raw, listen: 127.0.0.1:6380, protocol: tcp, upstream: cache }
        upstreams:
          - name: cache
            targets: [127.0.0.1:6379]
            health_check: { active: { type: tcp, path: /healthz } }
        """)
        XCTAssertEqual(found.map(\.path), ["upstreams[0].health_check.active.path"])
        XCTAssertEqual(found.first?.message, "does not apply to type tcp (a connect check)")
    }

    func testFixedPartIgnoresReloadableKeys() {
        var a = ListenerConfig()
        a.protocol = .tcp
        a.upstream = "x"
        var b = a
        b.upstream = "y"
        b.stream.idleTimeout = .seconds(1)
        b.plugins = [PluginRef(name: "p")]
        XCTAssertEqual(a.fixedPart, b.fixedPart)
        b.listen.port = 1
        XCTAssertNotEqual(a.fixedPart, b.fixedPart)
    }
}
