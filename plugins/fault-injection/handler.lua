-- fault-injection: makes a share of requests slow (delay) and/or fail
-- (abort) to test how clients cope, as Envoy's fault filter does. A delayed
-- request waits on weir.sleep, which yields: the event loop keeps serving
-- other requests. The delay is applied first, so a request can be both.
local weir = require "weir"

local FaultInjection = { PRIORITY = 1500, VERSION = "1.0.0" }

local random = math.random

-- true for `percent` % of calls: random() is in [0, 1), so 0 never and
-- 100 always hits.
local function hit(percent)
  return percent > 0 and random() * 100 < percent
end

function FaultInjection:request(conf, ctx)
  if conf.delay and conf.delay > 0 and hit(conf.delay_percent) then
    weir.sleep(conf.delay)
  end
  if hit(conf.abort_percent) then
    return conf.abort_status, { message = conf.abort_message }
  end
end

return FaultInjection
