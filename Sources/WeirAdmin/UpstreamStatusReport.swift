import WeirCore

/// The admin `/upstreams` document: every upstream's targets with their
/// health as the balancers see it right now.
///
/// ```json
/// {"upstreams":[{"name":"demo","healthy_targets":1,"targets":[
///   {"address":"127.0.0.1:9001","weight":1,"status":"healthy","ejections":0}]}]}
/// ```
/// `status` is `healthy`, `unhealthy` (down by active checks) or `ejected`
/// (taken out by passive checks until its ejection ends).
public enum UpstreamStatusReport {
    public static func json(upstreams: [UpstreamConfig], health: (String) -> UpstreamHealth?,
                            now: UInt64 = MonotonicClock.now()) -> String {
        var items: [String] = []
        for upstream in upstreams {
            let state = health(upstream.name)
            var targets: [String] = []
            var healthyCount = 0
            for (index, target) in upstream.targets.enumerated() {
                let status: TargetHealthStatus
                let ejections: Int
                if let state = state, index < state.targetCount {
                    status = state.status(index, now: now)
                    ejections = state.ejectionCount(index)
                } else {
                    status = .healthy // no health state: the target is always eligible
                    ejections = 0
                }
                if status == .healthy { healthyCount += 1 }
                targets.append("{\"address\":\(quoted(target.address.description)),\"weight\":\(target.weight),"
                    + "\"status\":\(quoted(status.rawValue)),\"ejections\":\(ejections)}")
            }
            items.append("{\"name\":\(quoted(upstream.name)),\"healthy_targets\":\(healthyCount),"
                + "\"targets\":[\(targets.joined(separator: ","))]}")
        }
        return "{\"upstreams\":[\(items.joined(separator: ","))]}"
    }

    private static func quoted(_ s: String) -> String { "\"" + AdminResponse.jsonEscape(s) + "\"" }
}
