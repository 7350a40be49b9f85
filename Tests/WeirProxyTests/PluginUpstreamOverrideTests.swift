// weir.upstream overrides that reach into the upstream connection itself
// (issue 3): a plugin's connect timeout applies to the connection the
// request opens.

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class PluginUpstreamOverrideTests: XCTestCase {
    var group: MultiThreadedEventLoopGroup!
    var folder: PluginFolder!

    override func setUpWithError() throws {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        folder = try PluginFolder()
    }

    override func tearDownWithError() throws {
        try group.syncShutdownGracefully()
        folder.remove()
    }

    /// The upstream's connect timeout is 60 s; the plugin's 0.2 s wins, so a
    /// target whose SYNs are dropped answers 504 long before the client's
    /// own 20 s read timeout (without the override the client times out).
    func testSetTimeoutsConnectAppliesToNewConnections() throws {
        try folder.write("impatient", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:request(conf, ctx)
          weir.upstream.set_timeouts(0.2, nil, nil)
        end
        return P
        """)
        let listener = try StalledListener()
        let config = ProxyHarness.config(targets: [HostPort(host: "127.0.0.1", port: listener.port)]) {
            $0.upstreams[0].timeouts.connect = .seconds(60)
            $0.upstreams[0].retries = 0
            $0.plugins = [pluginRef("impatient")]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let response = try proxy.connect(timeoutSeconds: 20).request("GET", "/")
        XCTAssertEqual(response.status, 504)
        XCTAssertTrue(response.bodyText.contains("upstream_timeout"), response.bodyText)
        _ = listener
    }
}
