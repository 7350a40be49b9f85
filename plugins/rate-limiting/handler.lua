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

-- The SDK functions used per request, looked up once (each `weir.x.y` in
-- the request path is two table reads).
local get_route, get_header = weir.request.get_route, weir.request.get_header
local get_route_and_consumer = weir.request.get_route_and_consumer
local get_consumer, get_ip = weir.client.get_consumer, weir.client.get_ip
local prepare_headers, unpack = weir.response.prepare_headers, table.unpack
-- weir.time.now is read from weir.time per call: the tests' clock plugin replaces it.
local time = weir.time

local RateLimiting = { PRIORITY = 910, VERSION = "1.0.0" }

-- Header names are spelled out here, not built per request.
local PERIODS = {
  { name = "second", seconds = 1, limit_header = "x-ratelimit-limit-second", remaining_header = "x-ratelimit-remaining-second" },
  { name = "minute", seconds = 60, limit_header = "x-ratelimit-limit-minute", remaining_header = "x-ratelimit-remaining-minute" },
  { name = "hour", seconds = 3600, limit_header = "x-ratelimit-limit-hour", remaining_header = "x-ratelimit-remaining-hour" },
  { name = "day", seconds = 86400, limit_header = "x-ratelimit-limit-day", remaining_header = "x-ratelimit-remaining-day" },
}

local ceil, max, tostring, tonumber = math.ceil, math.max, tostring, tonumber

-- What depends only on the config, worked out on a config's first request
-- and kept in the config table itself, under a key no config field can
-- have (a NUL byte in it: a short-string field read costs ~40
-- instructions per request, a weak table indexed by the config ~130): the
-- configured periods (flat, with everything a request reads precomputed),
-- the counter keys of the clients seen (see client_keys), for policy local
-- the dictionary (or why there is none), and the remaining counts reused by
-- every request (nil when the headers are hidden; filled after any yield and
-- read before the next: one array per config serves both policies).

local function conf_state(conf)
  local periods = {}
  for _, period in ipairs(PERIODS) do
    local limit = conf[period.name]
    if limit then
      periods[#periods + 1] = { name = period.name, window = period.seconds, ttl = 2 * period.seconds + 1,
                                limit = limit, limit_text = tostring(limit),
                                limit_header = period.limit_header, remaining_header = period.remaining_header }
    end
  end
  local st = { periods = periods, n = #periods, clients = {}, client_count = 0,
               by_header = conf.limit_by == "header", by_route = conf.limit_by == "route",
               by_consumer = conf.limit_by == "consumer", redis = conf.policy == "redis",
               remaining = not conf.hide_client_headers and {} or nil, values = {} }
  if not st.redis then
    -- The dictionaries are declared with the config: one that is missing
    -- now stays missing for this config's life.
    st.dict = weir.shared[conf.dictionary]
    if not st.dict then
      st.dict_error = "no weir.shared dictionary named '" .. conf.dictionary .. "'; declare it under shared_dicts"
    elseif #periods == 1 then
      -- The one period, for the request path's one-period case.
      st.one = periods[1]
      -- dict:incr_sliding read once: a method call on the dictionary
      -- finds it through its metatable's __index on every request.
      st.incr_sliding = st.dict.incr_sliding
    end
  end
  if not conf.hide_client_headers then
    -- The header lines, prepared once: each period's X-RateLimit-Limit-*
    -- (fixed) and X-RateLimit-Remaining-*, then RateLimit-Limit (fixed
    -- with one period; with several the tightest period's), -Remaining
    -- and -Reset. A request passes only the values that change.
    local lines = {}
    for _, p in ipairs(periods) do
      lines[#lines + 1] = { p.limit_header, p.limit_text }
      lines[#lines + 1] = p.remaining_header
    end
    lines[#lines + 1] = #periods == 1 and { "ratelimit-limit", periods[1].limit_text } or "ratelimit-limit"
    lines[#lines + 1] = "ratelimit-remaining"
    lines[#lines + 1] = "ratelimit-reset"
    st.headers = prepare_headers(lines)
  end
  conf["\0rate-limiting"] = st
  return st
end

local function identifier(conf, st)
  if st.by_consumer then
    return get_consumer() or get_ip()
  elseif st.by_header then
    return get_header(conf.header_name) or get_ip()
  elseif st.by_route then
    -- Every client of the route shares one budget (the route part of the key
    -- already separates routes).
    return ""
  end
  return get_ip()
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

local function new_client_keys(st, conf, route, id)
  if st.client_count >= MAX_CLIENTS then
    st.clients, st.client_count = {}, 0
  end
  local clients = st.clients[route]
  if not clients then
    clients = {}
    st.clients[route] = clients
  end
  -- [i]: { start, key, prev_key } of period i's current window
  local keys = { base = "rl|" .. #route .. ":" .. route .. "|" .. conf.limit_by .. "|" .. #id .. ":" .. id .. "|" }
  clients[id] = keys
  st.client_count = st.client_count + 1
  return keys
end

-- The counter keys of period i's window starting at `start` (made once per window).
local function window_keys(keys, i, p, start)
  local prefix = keys.base .. p.name .. "|"
  local k = { start = start, key = prefix .. start, prev_key = prefix .. (start - p.window) }
  keys[i] = k
  return k
end

-- The sliding estimate of period p's last `window` seconds with this
-- request: `prev` in the previous window weighted by what of it the last
-- `window` seconds still cover, plus `count` in the current one.
local function estimate(p, k, now, count, prev)
  local window = p.window
  return prev * (window - (now - k.start)) / window + count
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

-- Returns the index of the refused period (its increment and the other
-- periods' given back by the script) and that period's count and previous
-- count, or false and the index of the tightest period, or nil, err when
-- the counters cannot be used. Fills `remaining` (limit - estimate,
-- floored, >= 0) unless the headers are hidden.
local function count_redis(conf, st, keys, now, second, remaining)
  -- The connection settings and the script (its SHA1, ~45 k instructions
  -- to compute) depend only on the config: made on its first request and
  -- kept with it. Still one EVALSHA per request.
  local script = st.script
  if not script then
    local r = conf.redis or {}
    local red = weir.redis.connect{ host = r.host, port = r.port, database = r.database,
                                    username = r.username, password = r.password, timeout = r.timeout }
    script = red:script(REDIS_SCRIPT)
    st.script = script
  end
  local periods, rkeys, args = st.periods, {}, {}
  for i = 1, st.n do
    local p, k = periods[i], keys[i]
    local start = second - second % p.window
    if not k or k.start ~= start then k = window_keys(keys, i, p, start) end
    rkeys[#rkeys + 1] = k.key
    rkeys[#rkeys + 1] = k.prev_key
    args[#args + 1] = p.limit
    args[#args + 1] = p.window
    args[#args + 1] = tostring(now - k.start)
  end
  local reply, err = script:run(rkeys, args)
  if not reply then return nil, "redis: " .. tostring(err) end
  local refused = reply[1]
  if refused > 0 then
    return refused, tonumber(reply[2 * refused]), tonumber(reply[2 * refused + 1])
  end
  local tightest = 1
  if remaining then
    for i = 1, st.n do
      local e = estimate(periods[i], keys[i], now, tonumber(reply[2 * i]), tonumber(reply[2 * i + 1]))
      local rem = (periods[i].limit - e) // 1 | 0
      if rem < 0 then rem = 0 end
      remaining[i] = rem
      if rem < remaining[tightest] then tightest = i end
    end
  end
  return false, tightest
end

-- A counted request's end (both paths of RateLimiting:request): refused is
-- the refused period's index, false (admitted: tightest is the period with
-- the fewest requests left) or nil (the counters could not be used: count
-- is the message); count and prev are the refused period's counts.
local function conclude(conf, st, keys, now, second, refused, count, prev, tightest)
  if refused == nil then
    if conf.fault_tolerant then
      weir.log.err("rate-limiting: ", count, " (request let through: fault_tolerant)")
      return
    end
    error("rate-limiting: " .. count)
  end

  local remaining = st.remaining
  local periods, n = st.periods, st.n
  if remaining then
    -- The most restrictive period speaks for the RateLimit-* headers (the
    -- refused one when refused; every remaining count is 0 then). Counts
    -- are integers: the SDK writes them as text.
    if refused then
      tightest = refused
      for i = 1, n do remaining[i] = 0 end
    end
    local p = periods[tightest]
    -- Seconds to the end of the window, ceil(end - now), counted from the
    -- whole second: with `now` in [second, second + 1) that is
    -- end - second, an integer from 1 to the window's length.
    local reset = keys[tightest].start + p.window - second
    if n == 1 then
      st.headers:set(remaining[1], remaining[1], reset)
    else
      -- Each period's remaining count, then the tightest's limit, remaining and reset.
      local values = st.values
      for i = 1, n do values[i] = remaining[i] end
      values[n + 1], values[n + 2], values[n + 3] = p.limit_text, remaining[tightest], reset
      st.headers:set(unpack(values, 1, n + 3))
    end
  end

  if refused then
    local p = periods[refused]
    local wait = retry_after(p.limit, p.window, prev, count - 1, now - keys[refused].start)
    local headers = { ["retry-after"] = tostring(max(1, ceil(wait))) }
    return conf.error_code, { message = conf.error_message }, headers
  end
end

function RateLimiting:request(conf)
  local st = conf["\0rate-limiting"] or conf_state(conf)
  local route, id
  -- The default limit_by without the call to identifier(), and its route
  -- and consumer in one SDK call.
  if st.by_consumer then
    route, id = get_route_and_consumer()
    if not id then id = get_ip() end
  else
    route, id = get_route(), identifier(conf, st)
  end
  if not route then route = "" end
  local clients = st.clients[route]
  local keys = clients and clients[id] or new_client_keys(st, conf, route, id)
  local now = time.now()
  -- Window starts are whole seconds: one floor per request (`// 1` floors,
  -- `| 0` makes the whole float an integer), then integer arithmetic.
  local second = now // 1 | 0
  local one = st.one
  if one then
    -- policy local with one period (the usual config): the count, the
    -- sliding estimate, the decision and an admitted request's headers in
    -- one SDK call. X-RateLimit-Remaining-* and RateLimit-Remaining are the
    -- remaining count (each `true`), RateLimit-Reset the seconds to the
    -- window's end (as conclude's, for this one period). Answers the
    -- remaining count when admitted; false, the count and the previous
    -- window's when refused (the increment already taken back); nil and
    -- the error when the counter failed.
    local k, window = keys[1], one.window
    local start = second - second % window
    if not k or k.start ~= start then k = window_keys(keys, 1, one, start) end
    local r, c, pc = st.incr_sliding(st.dict, k.key, k.prev_key, window, now - start, one.limit, one.ttl,
                                     st.headers, true, true, start + window - second)
    if r then return end
    if r == nil then return conclude(conf, st, keys, now, second, nil, "counter update failed: " .. tostring(c)) end
    return conclude(conf, st, keys, now, second, 1, c, pc)
  end

  -- refused: the refused period's index, or false; nil when the counters
  -- cannot be used (`count` is the message then). tightest: the period
  -- with the fewest requests left.
  local refused, count, prev, tightest
  local remaining = st.remaining
  local periods, n = st.periods, st.n   -- n >= 1: schema at_least_one_of
  local dict = st.dict
  if dict then
    refused, tightest = false, 1
    -- policy local, the whole decision in one pass over the periods, here
    -- and not in a function of its own (this runs on every request: no
    -- calls but the counter's, no per-request tables). Moves each period's
    -- window keys on when its window has moved on.
    for i = 1, n do
      local p, k = periods[i], keys[i]
      local window = p.window
      local start = second - second % window
      if not k or k.start ~= start then k = window_keys(keys, i, p, start) end
      -- The window's count and the previous window's, in one SDK call (the
      -- counters only ever hold numbers: incr made them).
      local c, pc = dict:incr_get(k.key, 1, 0, p.ttl, k.prev_key)
      if not c then
        for j = 1, i - 1 do dict:incr(keys[j].key, -1) end   -- the windows taken so far
        refused, count = nil, "counter update failed: " .. tostring(pc)
        break
      end
      if not pc then pc = 0 end
      -- estimate() inlined.
      local e = pc * (window - (now - start)) / window + c
      if e > p.limit then
        if not refused then refused, count, prev = i, c, pc end
      elseif remaining then
        -- limit - estimate floored, as an integer (`// 1` floors, `| 0`
        -- makes the whole float an integer: no math.floor call).
        local r = (p.limit - e) // 1 | 0
        remaining[i] = r
        if r < remaining[tightest] then tightest = i end
      end
    end
    if refused then
      -- A refused request takes its increments back.
      for i = 1, n do dict:incr(keys[i].key, -1) end
    end
  elseif st.redis then
    refused, count, prev = count_redis(conf, st, keys, now, second, remaining)
    if refused == false then tightest = count end
  else
    count = st.dict_error
  end
  return conclude(conf, st, keys, now, second, refused, count, prev, tightest)
end

return RateLimiting
