// prepared:set writes its lines as wire bytes (1468bdd, 155b876): a value
// it does not take as it is (CR, LF or NUL in it, a float) goes the
// general way, set_header's (lua/README.md: a value with CR/LF only clears
// its line), so a client never sees an injected line; integers at both
// ends are written whole; a name given in upper case replaces the
// upstream's line of that name.

import Foundation
import WeirCore
import WeirProxy
import XCTest

final class PreparedLinesValueTests: PluginFolderTestCase {
    func testValuesTheWireWriterRefusesNeverReachTheClientAsLines() throws {
        try folder.write("values", handler: """
        local weir = require "weir"
        local P = { PRIORITY = 100, VERSION = "1" }
        local lines = weir.response.prepare_headers({ "X-Upstream", "x-value" })
        local values = {
          ["/crlf"] = "a\\r\\nx-injected: 1",
          ["/lf"] = "a\\nx-injected: 1",
          ["/nul"] = "a\\0b",
          ["/float"] = 1.5,
          ["/big"] = math.maxinteger,
          ["/negative"] = math.mininteger,
          -- Past prepared:set's 512-byte stack room: measured, then written.
          ["/long"] = string.rep("v", 600),
        }
        function P:request(conf, ctx)
          local ok, err = pcall(lines.set, lines, "mine", values[weir.request.get_path()])
          weir.response.set_header("x-set", ok and "ok" or "refused")
        end
        return P
        """)
        let config = ProxyHarness.config(targets: [upstream.address]) { $0.plugins = [pluginRef("values")] }
        let proxy = try PluginProxy(config: config, folder: folder, loops: 1)
        defer { proxy.stop() }
        let client = try proxy.connect()
        for path in ["/crlf", "/lf", "/nul"] {
            let response = try client.request("GET", path)
            XCTAssertEqual(response.status, 200, path)
            XCTAssertEqual(response.headerValues("x-set"), ["ok"], path)
            XCTAssertEqual(response.headerValues("x-injected"), [], path)
            XCTAssertEqual(response.headerValues("x-value"), [], path + ": the line is only cleared")
            XCTAssertEqual(response.headerValues("x-upstream"), ["mine"], path)
        }
        for (path, value) in [("/float", "1.5"), ("/big", "9223372036854775807"), ("/negative", "-9223372036854775808"),
                             ("/long", String(repeating: "v", count: 600))] {
            let response = try client.request("GET", path)
            XCTAssertEqual(response.status, 200, path)
            XCTAssertEqual(response.headerValues("x-set"), ["ok"], path)
            XCTAssertEqual(response.headerValues("x-value"), [value], path)
            XCTAssertEqual(response.headerValues("x-upstream"), ["mine"], path)
        }
    }
}
