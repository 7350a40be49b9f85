/// The standard `ProxyObserver`: feeds every finished request to the metrics
/// registry and (when enabled) the access log. Both are sharded per event
/// loop, so this adds no cross-loop contention to the data path.
public final class GatewayObserver: ProxyObserver, @unchecked Sendable {
    public let metrics: MetricsRegistry
    public let accessLog: AccessLogWriter?

    public init(metrics: MetricsRegistry = MetricsRegistry(), accessLog: AccessLogWriter?) {
        self.metrics = metrics
        self.accessLog = accessLog
        if let accessLog = accessLog {
            metrics.addExternalCounter(
                name: "weir_access_log_dropped_total",
                help: "Access log lines dropped because the writer could not keep up.",
                read: { [weak accessLog] in accessLog?.droppedLines ?? 0 })
        }
    }

    /// Without an access log only metrics read a request: a sample will do.
    public var wantsAccessRecords: Bool { accessLog != nil }

    public func requestCompleted(_ record: AccessRecord) {
        metrics.recordRequest(record)
        accessLog?.append(record)
    }

    public func requestCounted(_ sample: RequestSample) {
        metrics.recordRequest(sample)
    }

    public func requestCounter(route: String?, upstream: String?) -> RequestCounter? {
        metrics.requestCounter(route: route, upstream: upstream)
    }

    public func connectionOpened(listener: String) {
        metrics.connectionOpened(listener: listener)
    }

    public func connectionClosed(listener: String) {
        metrics.connectionClosed(listener: listener)
    }

    public func streamCounters(listener: String, upstream: String?) -> StreamCounters? {
        metrics.streamCounters(listener: listener, upstream: upstream)
    }

    public func streamCompleted(_ record: StreamRecord) {
        accessLog?.append(line: StreamLogFormatter.jsonLine(record))
    }
}
