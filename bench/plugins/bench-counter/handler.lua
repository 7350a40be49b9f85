-- Counts requests per consumer in a shared dictionary (the work a local
-- rate limiter does per request), for the benchmark.
local weir = require "weir"
local BenchCounter = { PRIORITY = 1002, VERSION = "1.0.0" }

function BenchCounter:request(conf, ctx)
  local counters = weir.shared[conf.dict]
  if not counters then
    weir.log.err("shared dictionary '" .. conf.dict .. "' is not declared in the config")
    return 500, { message = "bench-counter: missing shared dictionary" }
  end
  local consumer = ctx.bench_consumer or "anonymous"
  local _, err = counters:incr("req:" .. consumer, 1, 0)
  if err then
    weir.log.err("failed to increment counter: " .. tostring(err))
  end
end

return BenchCounter
