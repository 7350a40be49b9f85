// Hot reload of plugins through a running proxy: failed reloads keep the
// old generation serving, and the soak: requests on several keep-alive
// connections while reloading many times.

import Foundation
import NIOConcurrencyHelpers
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class ReloadTests: PluginFolderTestCase {
    /// A plugin that stamps its version in the request phase (a response
    /// header and weir.ctx), again in the response phase from weir.ctx, and
    /// answers `/exit` itself with the version as the body.
    private func writeVersion(_ version: String) throws {
        try folder.write("versioned", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "\(version)" }
        function P:request(conf, ctx)
          ctx.version = "\(version)"
          weir.response.set_header("x-version", "\(version)")
          if weir.request.get_path() == "/exit" then
            return 200, "body-\(version)"
          end
        end
        function P:response(conf, ctx)
          weir.response.set_header("x-version-response", ctx.version)
        end
        return P
        """)
    }

    private func writeConfig(to path: String) throws {
        let yaml = """
        listeners: [{ name: web, listen: 127.0.0.1:0 }]
        upstreams: [{ name: backend, targets: [127.0.0.1:\(upstream.port)] }]
        routes: [{ name: all, match: { paths: [/] }, upstream: backend }]
        plugins: [{ name: versioned }]
        plugin_paths: [plugins]
        access_log: "off"
        """
        try yaml.write(toFile: path, atomically: true, encoding: .utf8)
    }

    private func startProxy() throws -> (PluginProxy, String) {
        let path = folder.root + "/weir.yaml"
        try writeConfig(to: path)
        try writeVersion("A")
        let config = try ConfigLoader.load(path: path)
        return (try PluginProxy(config: config, folder: folder, configPath: path), path)
    }

    func testFailedReloadKeepsServingAndTheNextGoodOneWorks() throws {
        let (proxy, _) = try startProxy()
        defer { proxy.stop() }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/").header("x-version"), "A")
        XCTAssertEqual(proxy.generations.generation, 1)

        // Lua syntax error: refused with file and line; version A keeps serving.
        try folder.write("versioned", handler: "local P = { PRIORITY = 1, VERSION = '1' }\nfunction P:request(conf, ctx)\n  if then end\nend\nreturn P\n")
        guard case .failure(let error) = proxy.generations.reload() else { return XCTFail("reload should fail") }
        XCTAssertTrue(error.description.contains("versioned/handler.lua:3"), error.description)
        XCTAssertEqual(proxy.generations.generation, 1)
        XCTAssertEqual(try client.request("GET", "/").header("x-version"), "A")
        let status = proxy.generations.statusJSON
        XCTAssertTrue(status.contains("\"last_reload_result\":\"failed\""), status)
        XCTAssertTrue(status.contains("handler.lua:3"), status)

        // A bad plugin config in the YAML: refused with its path.
        try folder.write("versioned", handler: "local P = { PRIORITY = 1, VERSION = '1' } function P:request() end return P",
                         schema: "return { fields = { n = { type = \"integer\", default = 1, description = \"n\" } } }")
        var yaml = try String(contentsOfFile: folder.root + "/weir.yaml", encoding: .utf8)
        yaml = yaml.replacingOccurrences(of: "plugins: [{ name: versioned }]", with: "plugins: [{ name: versioned, config: { n: many } }]")
        try yaml.write(toFile: folder.root + "/weir.yaml", atomically: true, encoding: .utf8)
        guard case .failure(let configError) = proxy.generations.reload() else { return XCTFail("reload should fail") }
        XCTAssertTrue(configError.description.contains("plugins[0].config.n"), configError.description)

        // A change of listeners is refused (listeners stay open; restart to apply).
        try writeConfig(to: folder.root + "/weir.yaml")
        var changed = try String(contentsOfFile: folder.root + "/weir.yaml", encoding: .utf8)
        changed = changed.replacingOccurrences(of: "listen: 127.0.0.1:0", with: "listen: 127.0.0.1:1")
        try changed.write(toFile: folder.root + "/weir.yaml", atomically: true, encoding: .utf8)
        guard case .failure(let listenerError) = proxy.generations.reload() else { return XCTFail("reload should fail") }
        XCTAssertTrue(listenerError.description.contains("listeners"), listenerError.description)

        // Fixed: the next reload works, on the same keep-alive connection.
        try writeConfig(to: folder.root + "/weir.yaml")
        try writeVersion("B")
        guard case .success(let number) = proxy.generations.reload() else { return XCTFail("reload should work") }
        XCTAssertEqual(number, 2)
        XCTAssertEqual(try client.request("GET", "/").header("x-version"), "B")
        XCTAssertTrue(proxy.generations.statusJSON.contains("\"last_reload_result\":\"ok\""))
    }

    /// A keep-alive connection accepted under version A: after the reload
    /// its next request first runs B's connection phase, so weir.conn is B's.
    func testConnectionPhaseOfTheNewGenerationRunsForOldConnections() throws {
        func write(_ v: String) throws {
            try folder.write("versioned", handler: """
            local weir = require "weir"
            local P = { PRIORITY = 100, VERSION = "\(v)" }
            function P:connection(conf, conn) conn.data.v = "\(v)" end
            function P:request(conf, ctx) weir.response.set_header("x-conn", tostring(weir.conn and weir.conn.v)) end
            return P
            """)
        }
        let (proxy, _) = try startProxy()
        defer { proxy.stop() }
        try write("A")
        guard case .success = proxy.generations.reload() else { return XCTFail("reload") }
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/").header("x-conn"), "A")
        XCTAssertEqual(try client.request("GET", "/").header("x-conn"), "A")
        try write("B")
        guard case .success = proxy.generations.reload() else { return XCTFail("reload") }
        XCTAssertEqual(try client.request("GET", "/").header("x-conn"), "B")
        XCTAssertEqual(try client.request("GET", "/").header("x-conn"), "B")
        // Counted while the client is certainly open (an optimised build may
        // free it, closing the socket, right after its last use).
        withExtendedLifetime(client) { XCTAssertEqual(proxy.harness.observer.closed, 0) }
    }

    func testWatcherReloadsAfterAFileChange() throws {
        let (proxy, _) = try startProxy()
        defer { proxy.stop() }
        proxy.generations.startWatching(interval: 0.1)
        let client = try proxy.connect()
        XCTAssertEqual(try client.request("GET", "/").header("x-version"), "A")
        // The watcher compares against its first snapshot, whose moment is
        // not known here: write again (new mtime) until it has noticed.
        var reloaded = false
        for _ in 0..<10 where !reloaded {
            try writeVersion("B")
            reloaded = waitUntil(timeout: 2) { proxy.generations.generation >= 2 }
        }
        XCTAssertTrue(reloaded, "watcher reloaded")
        XCTAssertEqual(try client.request("GET", "/").header("x-version"), "B")
    }

    /// Four keep-alive connections keep requesting while the plugin flips
    /// between versions A and B 60 times: no request fails, no connection
    /// resets, and each response is wholly one version.
    func testReloadSoak() throws {
        let (proxy, _) = try startProxy()
        defer { proxy.stop() }
        let stop = ManagedFlag()
        let failures = NIOLockedValueBox<[String]>([])
        let counts = NIOLockedValueBox<[String: Int]>([:])
        let clients = try (0..<4).map { _ in try proxy.connect() }
        let done = DispatchGroup()
        for (i, client) in clients.enumerated() {
            DispatchQueue.global().async(group: done) {
                var n = 0
                while !stop.isSet {
                    n += 1
                    let path = n % 2 == 0 ? "/exit" : "/c\(i)/\(n)"
                    do {
                        let r = try client.request("GET", path)
                        let v = r.header("x-version") ?? "?"
                        var ok = r.status == 200 && (v == "A" || v == "B")
                        if path == "/exit" { ok = ok && r.bodyText == "body-\(v)" }
                        else { ok = ok && r.header("x-version-response") == v && r.bodyText == "ok from upstream" }
                        if !ok { failures.withLockedValue { $0.append("\(path): \(r.status) \(r.headers) \(r.bodyText)") } }
                        counts.withLockedValue { $0[v, default: 0] += 1 }
                    } catch {
                        failures.withLockedValue { $0.append("\(path): \(error)") }
                        return
                    }
                }
            }
        }
        for round in 0..<60 {
            try writeVersion(round % 2 == 0 ? "B" : "A")
            guard case .success = proxy.generations.reload() else { XCTFail("reload \(round) failed"); break }
            usleep(5_000)
        }
        stop.set()
        done.wait()
        XCTAssertEqual(failures.withLockedValue { $0 }, [])
        XCTAssertEqual(proxy.generations.generation, 61)
        let seen = counts.withLockedValue { $0 }
        XCTAssertGreaterThan(seen["A", default: 0], 0)
        XCTAssertGreaterThan(seen["B", default: 0], 0)
        // Every connection is still open and usable.
        for client in clients { XCTAssertEqual(try client.request("GET", "/last").status, 200) }
        withExtendedLifetime(clients) {
            XCTAssertEqual(proxy.harness.observer.closed, 0, "no connection was closed or reset")
        }
    }

    /// 200 reloads: memory comes back (old generations' Lua states freed).
    func testMemoryFlatAfterManyReloads() throws {
        let (proxy, _) = try startProxy()
        defer { proxy.stop() }
        let client = try proxy.connect()
        func cycle(_ count: Int) throws {
            for round in 0..<count {
                try writeVersion(round % 2 == 0 ? "B" : "A")
                guard case .success = proxy.generations.reload() else { return XCTFail("reload failed") }
                XCTAssertEqual(try client.request("GET", "/").status, 200)
            }
        }
        try cycle(40)   // warm up allocator pools
        let before = currentRSS()
        try cycle(200)
        let after = currentRSS()
        // Each generation holds two Lua states (~100+ KB each); leaking them
        // all would add tens of MB.
        XCTAssertLessThan(after - before, 8 << 20, "RSS \(before) -> \(after)")
    }
}

/// A flag set once, read from several threads.
final class ManagedFlag: @unchecked Sendable {
    private let box = NIOLockedValueBox(false)
    var isSet: Bool { box.withLockedValue { $0 } }
    func set() { box.withLockedValue { $0 = true } }
}
