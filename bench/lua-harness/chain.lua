-- Issue 3's chain (bench/plugins: bench-key-check, bench-counter,
-- bench-consumer-header) with the configs of bench/templates/weir-lua.yaml
-- after schema defaults, run per request the way the proxy's runner runs a
-- phase (Sources/CLuaShims/chain.c): a fresh ctx table, then each entry
-- called as fn(self, conf, ctx) from C (chain_run, harness.c). With the
-- natives stubbed this is the floor of the chain in stock Lua 5.4: the
-- plugins' own code, the SDK's Lua and the VM's calls, and nothing the
-- proxy does. WHICH=chain runs it; WHICH=none runs the same loop empty.
local root = ...
-- The collector the proxy's states run (weir_newstate in Sources/CLuaShims/shims.c).
collectgarbage("generational")
local function plugin(name) return dofile(root .. "/bench/plugins/" .. name .. "/handler.lua") end
local key_check, counter, consumer_header = plugin("bench-key-check"), plugin("bench-counter"), plugin("bench-consumer-header")
local list = {
  key_check.request, key_check, { header = "apikey", keys = { ["bench-key"] = "bench-consumer" } },
  counter.request, counter, { dict = "bench" },
  consumer_header.request, consumer_header, { header = "X-Consumer-Name" },
}
if (os.getenv("WHICH") or "chain") == "none" then list = {} end
return function(n) chain_run(n, list) end
