import WeirCore

// The active checker reports into the same health state the balancers read;
// UpstreamHealth applies the healthy/unhealthy thresholds.
extension UpstreamHealth: HealthProbeSink {
    public func isUpByActiveChecks(_ target: Int) -> Bool? {
        guard target < targetCount else { return nil }
        return status(target, now: MonotonicClock.now()) != .unhealthy
    }
}
