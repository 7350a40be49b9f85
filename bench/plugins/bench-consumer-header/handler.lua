-- Tells the upstream who the consumer is, as key-auth does, for the benchmark.
local weir = require "weir"
local BenchConsumerHeader = { PRIORITY = 1001, VERSION = "1.0.0" }

function BenchConsumerHeader:request(conf, ctx)
  local consumer = ctx.bench_consumer
  if consumer then
    weir.upstream.request.set_header(conf.header, consumer)
  end
end

return BenchConsumerHeader
