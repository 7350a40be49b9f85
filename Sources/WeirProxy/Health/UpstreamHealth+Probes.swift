import WeirCore

// The active checker reports into the same health state the balancers read;
// UpstreamHealth applies the healthy/unhealthy thresholds.
extension UpstreamHealth: HealthProbeSink {}
