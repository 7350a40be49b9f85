// An early exit's body goes through the chain's body_filter (issue 3; as
// Kong runs body filters on kong.response.exit bodies).

import Foundation
import NIOPosix
import WeirCore
import WeirProxy
import XCTest

final class PluginExitBodyFilterTests: PluginFolderTestCase {
    func testExitBodyIsFilteredAsOneLastChunkWithItsLength() throws {
        try folder.write("gate", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 200, VERSION = "1" }
        function P:request(conf, ctx)
          if weir.request.get_header("x-deny") then return 403, "denied by gate" end
        end
        return P
        """)
        try folder.write("shout", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        function P:body_filter(conf, ctx)
          local chunk = weir.response.get_chunk()
          if weir.response.is_last_chunk() then chunk = chunk .. "!" end
          weir.response.set_chunk(chunk:upper())
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) {
            $0.plugins = [pluginRef("gate"), pluginRef("shout")]
        }
        let proxy = try PluginProxy(config: config, folder: folder)
        defer { proxy.stop() }
        let client = try proxy.connect()
        let denied = try client.request("GET", "/x", headers: [("x-deny", "1")])
        XCTAssertEqual(denied.status, 403)
        XCTAssertEqual(denied.bodyText, "DENIED BY GATE!")
        XCTAssertEqual(denied.header("content-length"), "15")
        // The same keep-alive connection goes on: the length was right.
        let passed = try client.request("GET", "/y")
        XCTAssertEqual(passed.status, 200)
        XCTAssertEqual(passed.bodyText, "OK FROM UPSTREAM!")
    }
}
