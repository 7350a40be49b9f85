-- Key-auth-like check for the benchmark: the `apikey` request header must
-- name a known consumer (one table lookup), else 401. The consumer is left
-- in the request's ctx table (weir.ctx) for the next plugins of the chain.
local weir = require "weir"
local BenchKeyCheck = { PRIORITY = 1003, VERSION = "1.0.0" }

function BenchKeyCheck:request(conf, ctx)
  local key = weir.request.get_header(conf.header)
  local consumer = key and conf.keys[key]
  if not consumer then
    return 401, { message = "no valid API key found in request" },
      { ["WWW-Authenticate"] = 'Key realm="bench"' }
  end
  ctx.bench_consumer = consumer
end

return BenchKeyCheck
