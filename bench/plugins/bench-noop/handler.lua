-- Does nothing in the request phase: measures the fixed cost of calling one
-- plugin per request (coroutine, phase dispatch) in bench/run.sh.
local BenchNoop = { PRIORITY = 1000, VERSION = "1.0.0" }

function BenchNoop:request(conf, ctx)
end

return BenchNoop
