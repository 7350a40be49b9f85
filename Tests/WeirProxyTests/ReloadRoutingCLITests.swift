import Foundation
import NIOPosix
import WeirAdmin
import WeirCore
import WeirTestSupport
import XCTest

/// Reload of routes and upstreams through the real `weir` executable: the
/// new route serves, and the active health checker, `GET /upstreams` and
/// `GET /config` follow the new upstream set.
final class ReloadRoutingCLITests: XCTestCase {
    func testRoutesAndUpstreamsReloadInARunningGateway() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let folder = try PluginFolder()
        defer { folder.remove() }
        let origin = DemoUpstream(listen: HostPort(host: "127.0.0.1", port: 0), bodySize: 16, group: group)
        try origin.start().wait()
        defer { _ = try? origin.stop().wait() }
        let originPort = try XCTUnwrap(origin.boundAddress?.port)
        let deadPort = try refusingPort()
        let configPath = folder.root + "/weir.yaml"
        func writeConfig(routes: String, targets: String) throws {
            try """
            listeners: [{ name: web, listen: "127.0.0.1:0" }]
            upstreams:
              - name: demo
                targets: [\(targets)]
                health_check:
                  active: { path: /healthz, interval: 100ms, timeout: 100ms, healthy: 1, unhealthy: 1 }
            routes: [\(routes)]
            admin: { listen: "127.0.0.1:0" }
            access_log: "off"
            """.write(toFile: configPath, atomically: true, encoding: .utf8)
        }
        try writeConfig(routes: "{ name: a, match: { paths: [/a] }, upstream: demo }", targets: "\"127.0.0.1:\(originPort)\"")

        let weir = try WeirChildProcess(["run", "--config", configPath, "--workers", "2", "--no-watch"])
        defer { weir.stop() }
        let proxyPort = try weir.port(listener: "web"), adminPort = try weir.adminPort()
        XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/a/1", group: group).status, 200)
        XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/b/1", group: group).status, 404)

        // Add route /b and a second target that is down.
        try writeConfig(routes: "{ name: a, match: { paths: [/a] }, upstream: demo }, { name: b, match: { paths: [/b] }, upstream: demo }",
                        targets: "\"127.0.0.1:\(originPort)\", \"127.0.0.1:\(deadPort)\"")
        let reloaded = try OpsTestHTTP.request(port: adminPort, method: .POST, path: "/reload", group: group)
        XCTAssertEqual(reloaded.status, 200, reloaded.body)
        XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/b/1", group: group).status, 200)
        // The checker probes the new target (it was not in the first config).
        OpsTestHTTP.eventually("new target probed unhealthy") {
            let body = (try? OpsTestHTTP.request(port: adminPort, path: "/upstreams", group: group))?.body ?? ""
            return body.contains("{\"address\":\"127.0.0.1:\(deadPort)\",\"weight\":1,\"status\":\"unhealthy\"")
        }
        // So traffic avoids it: every request succeeds.
        for i in 0..<10 {
            XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/b/\(i)", group: group).status, 200)
        }
        let config = try OpsTestHTTP.request(port: adminPort, path: "/config", group: group)
        XCTAssertTrue(config.body.contains("127.0.0.1:\(deadPort)"), config.body)

        // Changing the listeners is refused; routing keeps serving.
        try writeConfig(routes: "{ name: a, match: { paths: [/a] }, upstream: demo }", targets: "\"127.0.0.1:\(originPort)\"")
        var yaml = try String(contentsOfFile: configPath, encoding: .utf8)
        yaml = yaml.replacingOccurrences(of: "name: web, listen: \"127.0.0.1:0\"", with: "name: web, listen: \"127.0.0.1:\(deadPort)\"")
        try yaml.write(toFile: configPath, atomically: true, encoding: .utf8)
        let refused = try OpsTestHTTP.request(port: adminPort, method: .POST, path: "/reload", group: group)
        XCTAssertEqual(refused.status, 400)
        XCTAssertTrue(refused.body.contains("listeners"), refused.body)
        XCTAssertEqual(try OpsTestHTTP.request(port: proxyPort, path: "/b/2", group: group).status, 200)
    }
}
