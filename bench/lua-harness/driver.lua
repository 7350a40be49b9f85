-- key-auth + rate-limiting's request phases as in bench/templates/weir-auth-local.yaml
-- (the configs after schema defaults). WHICH=ka|rl|both|none picks what the loop runs.
local root = ...
local function plugin(name) return dofile(root .. "/plugins/" .. name .. "/handler.lua") end
local KA, RL = plugin("key-auth"), plugin("rate-limiting")
local ka_conf = { key_names = { "apikey" }, key_in_header = true, key_in_query = true, hide_credentials = true,
                  run_on_preflight = true, realm = "weir" }
local rl_conf = { minute = 1000000000, limit_by = "consumer", policy = "local", dictionary = "rate-limiting",
                  fault_tolerant = true, hide_client_headers = false, error_code = 429,
                  error_message = "API rate limit exceeded" }
local which = os.getenv("WHICH") or "both"
local run_ka, run_rl = which == "ka" or which == "both", which == "rl" or which == "both"
return function(n)
  for _ = 1, n do
    if run_ka then assert(KA.request(KA, ka_conf) == nil) end
    if run_rl then assert(RL.request(RL, rl_conf) == nil) end
  end
end
