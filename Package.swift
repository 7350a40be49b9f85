// swift-tools-version:6.0
import PackageDescription

// Weir: one proxy core, gateway or sidecar mode, Lua 5.4 policy plugins.
// Module map (see DESIGN.md in shared/ and README.md):
//   CLua        system library: Debian's liblua5.4-dev (liblua5.4.a, linked statically)
//   CLuaShims   C trampolines so no Lua longjmp ever crosses a Swift frame
//   CNghttp2    system library: Debian's libnghttp2-dev (downstream HTTP/2)
//   WeirLua     Lua states, coroutines, the `weir` SDK bindings
//   WeirCore    config model + validation, routing, balancers (no I/O)
//   WeirProxy   the NIO data path: listeners, HTTP/1 framing, upstream pools, TLS
//   WeirAdmin   admin listener: health, readiness, metrics, config
//   weir        the executable
let swift5 = [SwiftSetting.swiftLanguageMode(.v5)]

let package = Package(
    name: "Weir",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "weir", targets: ["weir"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.81.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "5.0.1"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.2.0"),
        // weir.crypto's signature checks (RSA, ECDSA), SHA-384/512 HMACs and PBKDF2 (jwt, basic-auth).
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"4.0.0"),
        // HTTP/2 framing, HPACK, flow control, stream multiplexing (issue 4).
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        // TLS termination/origination (BoringSSL inside); it brings swift-certificates,
        // which WeirProxy also uses (peer identity).
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.19.4"),
    ],
    targets: [
        // Headers only (shim.h includes <lua5.4/...>): the library is linked
        // by CLuaShims below, statically.
        .systemLibrary(
            name: "CLua",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        // Debian's static liblua5.4.a (same package, same code as the .so):
        // calls into Lua skip the PLT, and profiles (callgrind, perf) name
        // the VM's functions, which the stripped liblua5.4.so hides.
        .target(
            name: "CLuaShims",
            dependencies: ["CLua"],
            linkerSettings: [.linkedLibrary(":liblua5.4.a"), .linkedLibrary("m")]
        ),
        // Downstream HTTP/2 (h2c, h2 by ALPN): framing, HPACK, streams and
        // flow control, driven sans-IO by HTTP2DownstreamConnection.
        .systemLibrary(
            name: "CNghttp2",
            pkgConfig: "libnghttp2",
            providers: [.apt(["libnghttp2-dev"])]
        ),
        .target(
            name: "WeirLua",
            dependencies: [
                "CLua", "CLuaShims", "WeirCore", "WeirRedis",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            // Data-path code like WeirProxy: every plugin call and SDK call
            // touches class fields (runtime, scope, natives table); dynamic
            // exclusivity checks were ~2k instructions per request of the
            // 3-plugin bench chain under callgrind.
            swiftSettings: swift5 + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]
        ),
        .target(
            name: "WeirCore",
            dependencies: [
                .product(name: "Yams", package: "Yams"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            exclude: ["README.md"],
            // The route table, balancers and target health run on every
            // request (see WeirProxy below for why the checks go).
            swiftSettings: swift5 + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]
        ),
        .target(
            name: "WeirProxy",
            dependencies: [
                "WeirCore", "WeirLua", "CNghttp2",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
            ],
            // The data path's handlers are classes whose fields are touched on
            // every event; dynamic exclusivity checks measured ~14% of the
            // proxy's instructions under callgrind (bench, 1 KB GETs).
            swiftSettings: swift5 + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]
        ),
        .target(
            name: "WeirAdmin",
            dependencies: [
                "WeirCore", "WeirProxy",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: swift5
        ),
        // Asynchronous RESP2 client, per event loop (weir.redis, rate-limiting policy: redis).
        .target(
            name: "WeirRedis",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            // Data-path code like WeirProxy: dynamic exclusivity checks were
            // ~20% of the instructions per command under callgrind.
            swiftSettings: swift5 + [.unsafeFlags(["-enforce-exclusivity=unchecked"])]
        ),
        .executableTarget(
            name: "weir",
            dependencies: [
                "WeirCore", "WeirProxy", "WeirAdmin", "WeirLua",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swift5
        ),
        // Route-table lookup micro-benchmark (bench/route-lookup); never a test.
        .executableTarget(
            name: "weir-route-bench",
            dependencies: ["WeirCore"],
            path: "bench/route-lookup",
            swiftSettings: swift5
        ),
        // HTTP/1.1 codec vs NIOHTTP1 parse + forward micro-benchmark (bench/codec); never a test.
        .executableTarget(
            name: "weir-codec-bench",
            dependencies: [
                "WeirProxy",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            path: "bench/codec",
            exclude: ["README.md", "callgrind.sh"],
            swiftSettings: swift5
        ),
        // WeirRedis INCR round-trip measure (bench/redis-client/run.sh); never a test.
        .executableTarget(
            name: "weir-redis-bench",
            dependencies: [
                "WeirRedis",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "bench/redis-client",
            exclude: ["run.sh"],
            swiftSettings: swift5
        ),
        // Consumer credential lookup / config load at 100,000 consumers (bench/consumers); never a test.
        .executableTarget(
            name: "weir-consumer-bench",
            dependencies: ["WeirCore", "WeirLua"],
            path: "bench/consumers",
            exclude: ["README.md", "gen_config.py", "run.sh", "auth-callgrind.sh"],
            swiftSettings: swift5
        ),
        // Real servers the test targets start (redis-server), shared so that
        // every target starts them the same way.
        .target(
            name: "WeirTestSupport",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
            ],
            path: "Tests/WeirTestSupport",
            swiftSettings: swift5
        ),
        .testTarget(
            name: "WeirRedisTests",
            dependencies: [
                "WeirRedis", "WeirTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: swift5
        ),
        .testTarget(name: "WeirCoreTests", dependencies: ["WeirCore"], swiftSettings: swift5),
        .testTarget(
            name: "WeirLuaTests",
            dependencies: [
                "WeirLua", "CLua", "CLuaShims", "WeirCore", "WeirTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swift5
        ),
        // Lua phase-cost micro-measure (bench/lua-phase); run by hand in release mode, never a test.
        .executableTarget(
            name: "weir-lua-bench",
            dependencies: [
                "WeirLua", "WeirCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            path: "bench/lua-phase",
            swiftSettings: swift5
        ),
        .testTarget(
            name: "WeirProxyTests",
            dependencies: [
                "WeirCore", "WeirProxy", "WeirAdmin", "WeirTestSupport",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swift5
        ),
    ]
)
