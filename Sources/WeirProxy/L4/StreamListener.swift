import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

// tcp and tls (passthrough) listeners at a glance (files in this folder):
//
//   client ──▶ StreamSideHandler(client) ─┐            ┌─ StreamSideHandler(upstream) ◀── target
//                                         ▼            ▼
//                                     StreamSession (one per connection)
//   accept ─ [tls: buffer the ClientHello, parse SNI/ALPN (ClientHello.swift)]
//          ─ [connection phase: listener + global plugins; may reject or
//             weir.upstream.set_upstream]
//          ─ upstream: plugin choice, else SNI route, else `upstream:` (StreamRouting.swift)
//          ─ target from the upstream's balancer; connect, retry another
//            target on failure (passive health counts it)
//          ─ replay the buffered bytes, then relay both ways
//
// - The relay: each StreamSideHandler hands a read straight to the other
//   side's channel core (write0, one flush0 per read burst, then read0 to
//   re-arm its own read): no session call and no pipeline walk per chunk.
// - Backpressure: a side reads only while the other side is writable
//   (autoRead switched on the writability changes, nothing per chunk).
// - Half-close: a FIN from one side is passed on as a FIN (shutdown of the
//   other side's output once its queued writes are out); the other
//   direction keeps flowing until it ends too.
// - Idle timeout: no byte either way for `idle_timeout` closes both sides.
// - Everything for one connection runs on the loop that accepted it; the
//   routing and plugins of the generation in force at accept serve it to
//   its end (a reload never touches a live connection).

extension ProxyServer {
    /// The bootstrap of a tcp/tls listener on one loop (see `start()`).
    func makeStreamBootstrap(loopContext: LoopContext, listener: ListenerRuntime) -> ServerBootstrap {
        let multipleLoops = loopContexts.count > 1
        return ServerBootstrap(group: loopContext.loop, childGroup: loopContext.loop)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.socketOption(NIOBSDSocket.Option(rawValue: SO_REUSEPORT)), value: multipleLoops ? 1 : 0)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            // FIN from the client is an event, not a close: it is passed on
            // to the upstream while the upstream's answer keeps flowing.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelOption(.recvAllocator, value: StreamSession.receiveAllocator)
            // tcp: nothing is read until the upstream is connected; tls
            // reads the ClientHello first (StreamSession switches reads).
            .childChannelOption(.autoRead, value: listener.config.protocol == .tls)
            .childChannelInitializer { channel in
                guard listener.admitConnection() else {
                    StreamSession.refuseOverLimit(channel, listener: listener)
                    return channel.eventLoop.makeSucceededVoidFuture()
                }
                let session = StreamSession(client: channel, loopContext: loopContext, listener: listener)
                do {
                    try channel.pipeline.syncOperations.addHandler(session.clientHandler)
                } catch {
                    listener.connectionClosed()
                    return channel.eventLoop.makeFailedFuture(error)
                }
                return channel.eventLoop.makeSucceededVoidFuture()   // the session starts on channelActive
            }
    }
}
