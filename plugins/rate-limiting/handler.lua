-- rate-limiting: sliding-window request limits per second/minute/hour/day,
-- counted in a weir.shared dictionary (policy local).
--
-- Each period keeps one counter per fixed window. The estimate for "the last
-- W seconds" is  previous_window * (1 - elapsed/W) + current_window , so a
-- burst at the end of one window plus a burst at the start of the next cannot
-- pass twice the limit. The current counter is incremented atomically first
-- and the request is admitted only if the estimate including itself is within
-- the limit; a refused request takes its increment back. Every admitted
-- request therefore saw a count that includes all earlier admitted ones, which
-- keeps the limit exact across event loops.
local weir = require "weir"

local RateLimiting = { PRIORITY = 910, VERSION = "1.0.0" }

-- Header names are spelled out here, not built per request.
local PERIODS = {
  { name = "second", seconds = 1, limit_header = "x-ratelimit-limit-second", remaining_header = "x-ratelimit-remaining-second" },
  { name = "minute", seconds = 60, limit_header = "x-ratelimit-limit-minute", remaining_header = "x-ratelimit-remaining-minute" },
  { name = "hour", seconds = 3600, limit_header = "x-ratelimit-limit-hour", remaining_header = "x-ratelimit-remaining-hour" },
  { name = "day", seconds = 86400, limit_header = "x-ratelimit-limit-day", remaining_header = "x-ratelimit-remaining-day" },
}

local floor, ceil, max, tostring, math_type = math.floor, math.ceil, math.max, tostring, math.type

-- Small whole numbers as text, each made once (seconds until the window
-- resets; formatting a number costs a C snprintf). Up to an hour's worth.
local small_text = setmetatable({}, { __index = function(t, n)
  local text = tostring(n)
  if math_type(n) == "integer" and n >= 0 and n <= 3600 then t[n] = text end
  return text
end })

-- What depends only on the config, worked out on a config's first request
-- and kept with it (weak keys: a retired generation's configs go away):
-- the configured periods with their limit as a header string, and the
-- counter keys of the clients seen (see client_keys).
local per_conf = setmetatable({}, { __mode = "k" })

local function conf_state(conf)
  local st = per_conf[conf]
  if st then return st end
  local periods = {}
  for _, period in ipairs(PERIODS) do
    local limit = conf[period.name]
    if limit then
      periods[#periods + 1] = { period = period, limit = limit, limit_text = tostring(limit) }
    end
  end
  st = { periods = periods, clients = {}, client_count = 0 }
  per_conf[conf] = st
  return st
end

local function identifier(conf)
  if conf.limit_by == "consumer" then
    return weir.client.get_consumer() or weir.client.get_ip()
  elseif conf.limit_by == "header" then
    return weir.request.get_header(conf.header_name) or weir.client.get_ip()
  elseif conf.limit_by == "route" then
    -- Every client of the route shares one budget (the route part of the key
    -- already separates routes).
    return ""
  end
  return weir.client.get_ip()
end

-- Seconds until one more request fits, given the window state after this
-- (refused) request was taken back: `prev` in the previous window, `cur`
-- admitted in the current one, `elapsed` into it.
local function retry_after(limit, window, prev, cur, elapsed)
  if cur + 1 <= limit then
    -- Fits in this window once the previous window's weight has decayed enough.
    local needed = window * (1 - (limit - cur - 1) / prev)
    return needed - elapsed
  end
  -- Needs the next window, where this window's count becomes the previous one.
  local needed = window * (1 - (limit - 1) / cur)
  return (window - elapsed) + max(0, needed)
end

-- Counter keys are "rl|<#route>:<route>|<limit_by>|<#id>:<id>|<period>|<window start>".
-- Counters are per route (as Kong keys them by route): the same client on
-- two routes has two budgets. Route and identifier are length-prefixed so a
-- header value containing "|" cannot collide with another client's keys.
-- A client's keys stay the same for a whole window, so they are kept per
-- route and client and rebuilt only when a window moves on. At most
-- MAX_CLIENTS clients are kept per config (limit_by ip meets any number of
-- clients): when full, the set starts over.
local MAX_CLIENTS = 4096

local function client_keys(st, conf, route, id)
  local clients = st.clients[route]
  local keys = clients and clients[id]
  if keys then return keys end
  if st.client_count >= MAX_CLIENTS then
    st.clients, st.client_count = {}, 0
    clients = nil
  end
  if not clients then
    clients = {}
    st.clients[route] = clients
  end
  -- [i]: { start, key, prev_key } of period i's current window
  keys = { base = "rl|" .. #route .. ":" .. route .. "|" .. conf.limit_by .. "|" .. #id .. ":" .. id .. "|" }
  clients[id] = keys
  st.client_count = st.client_count + 1
  return keys
end

-- The windows of the configured periods at time `now`:
-- { period, limit, limit_text, window, elapsed, key (current window), prev_key }.
local function windows(st, now, keys)
  local list = {}
  for i, p in ipairs(st.periods) do
    local window = p.period.seconds
    local start = floor(now / window) * window
    local k = keys[i]
    if not k or k.start ~= start then
      local prefix = keys.base .. p.period.name .. "|"
      k = { start = start, key = prefix .. start, prev_key = prefix .. (start - window) }
      keys[i] = k
    end
    list[i] = { period = p.period, limit = p.limit, limit_text = p.limit_text, window = window, elapsed = now - start,
                key = k.key, prev_key = k.prev_key }
  end
  return list
end

local function over(w)
  return w.prev * (w.window - w.elapsed) / w.window + w.count > w.limit
end

-- policy local: counters in a weir.shared dictionary. Fills w.count and
-- w.prev; returns the refused window (its increment given back) or nil, or
-- nil, err when the counters cannot be used.
local function count_local(conf, list)
  local dict = weir.shared[conf.dictionary]
  if not dict then
    return nil, "no weir.shared dictionary named '" .. conf.dictionary .. "'; declare it under shared_dicts"
  end
  local refused
  for i, w in ipairs(list) do
    local count, err = dict:incr(w.key, 1, 0, 2 * w.window + 1)
    if not count then
      for j = 1, i - 1 do dict:incr(list[j].key, -1) end   -- the windows taken so far
      return nil, "counter update failed: " .. tostring(err)
    end
    w.count = count
    w.prev = tonumber(dict:get(w.prev_key)) or 0
    if not refused and over(w) then refused = w end
  end
  if refused then
    for _, w in ipairs(list) do dict:incr(w.key, -1) end
  end
  return refused or false
end

-- policy redis: the same decision made atomically inside Redis by one script
-- (so it is exact across gateways sharing the server). KEYS: current and
-- previous key per window; ARGV: per window limit, window length, elapsed.
-- Returns { refused index (0 = none), count1, prev1, count2, prev2, ... }.
local REDIS_SCRIPT = [[
local out, refused, n = {}, 0, #KEYS / 2
for i = 1, n do
  local cur, prev = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, window, elapsed = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local count = redis.call("INCR", cur)
  if count == 1 then redis.call("EXPIRE", cur, 2 * window + 1) end
  local p = tonumber(redis.call("GET", prev) or "0") or 0
  out[#out + 1] = count
  out[#out + 1] = p
  if refused == 0 and p * (window - elapsed) / window + count > limit then refused = i end
end
if refused > 0 then
  for i = 1, n do redis.call("DECR", KEYS[2 * i - 1]) end
end
table.insert(out, 1, refused)
return out
]]

local function count_redis(conf, list)
  local r = conf.redis or {}
  local red = weir.redis.connect{ host = r.host, port = r.port, database = r.database,
                                  username = r.username, password = r.password, timeout = r.timeout }
  local keys, args = {}, {}
  for _, w in ipairs(list) do
    keys[#keys + 1] = w.key
    keys[#keys + 1] = w.prev_key
    args[#args + 1] = w.limit
    args[#args + 1] = w.window
    args[#args + 1] = tostring(w.elapsed)
  end
  local reply, err = red:script(REDIS_SCRIPT):run(keys, args)
  if not reply then return nil, "redis: " .. tostring(err) end
  for i, w in ipairs(list) do
    w.count = tonumber(reply[2 * i])
    w.prev = tonumber(reply[2 * i + 1])
  end
  return list[reply[1]] or false
end

function RateLimiting:request(conf)
  local st = conf_state(conf)
  local id = identifier(conf)
  local keys = client_keys(st, conf, weir.request.get_route() or "", id)
  local states = windows(st, weir.time.now(), keys)  -- never empty: schema at_least_one_of
  local refused, err
  if conf.policy == "redis" then refused, err = count_redis(conf, states) else refused, err = count_local(conf, states) end
  if refused == nil then
    if conf.fault_tolerant then
      weir.log.err("rate-limiting: ", err, " (request let through: fault_tolerant)")
      return
    end
    error("rate-limiting: " .. err)
  end
  for _, w in ipairs(states) do
    w.remaining = max(0, floor(w.limit - (w.prev * (w.window - w.elapsed) / w.window + w.count)))
  end
  refused = refused or nil

  if not conf.hide_client_headers then
    -- The most restrictive period speaks for the RateLimit-* headers.
    local tightest = refused or states[1]
    for _, s in ipairs(states) do
      if s.remaining < tightest.remaining then tightest = s end
    end
    for _, s in ipairs(states) do
      -- Each number becomes text once (the RateLimit-* pair repeats one period's).
      s.remaining_text = refused and "0" or tostring(s.remaining)
      weir.response.set_header(s.period.limit_header, s.limit_text)
      weir.response.set_header(s.period.remaining_header, s.remaining_text)
    end
    weir.response.set_header("ratelimit-limit", tightest.limit_text)
    weir.response.set_header("ratelimit-remaining", tightest.remaining_text)
    weir.response.set_header("ratelimit-reset", small_text[max(1, ceil(tightest.window - tightest.elapsed))])
  end

  if refused then
    local s = refused
    local wait = retry_after(s.limit, s.window, s.prev, s.count - 1, s.elapsed)
    local headers = { ["retry-after"] = tostring(max(1, ceil(wait))) }
    return conf.error_code, { message = conf.error_message }, headers
  end
end

return RateLimiting
