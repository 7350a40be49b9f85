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

local PERIODS = {
  { name = "second", seconds = 1 },
  { name = "minute", seconds = 60 },
  { name = "hour", seconds = 3600 },
  { name = "day", seconds = 86400 },
}

local floor, ceil, max = math.floor, math.ceil, math.max

local function identifier(conf)
  if conf.limit_by == "consumer" then
    return weir.client.get_consumer() or weir.client.get_ip()
  elseif conf.limit_by == "header" then
    if not conf.header_name then error("rate-limiting: header_name is required when limit_by is header") end
    return weir.request.get_header(conf.header_name) or weir.client.get_ip()
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

function RateLimiting:request(conf, ctx)
  local dict = weir.shared[conf.dictionary]
  if not dict then
    local message = "rate-limiting: no weir.shared dictionary named '" .. conf.dictionary ..
      "'; declare it under shared_dicts"
    if conf.fault_tolerant then weir.log.err(message .. " (request let through: fault_tolerant)") return end
    error(message)
  end

  local now = weir.time.now()
  -- The identifier is length-prefixed so a header value containing "|"
  -- cannot collide with another client's keys.
  local id = identifier(conf)
  local base = "rl|" .. conf.limit_by .. "|" .. #id .. ":" .. id .. "|"
  local taken, states, refused = {}, {}, nil
  for _, period in ipairs(PERIODS) do
    local limit = conf[period.name]
    if limit then
      local window = period.seconds
      local start = floor(now / window) * window
      local key = base .. period.name .. "|" .. start
      local count, err = dict:incr(key, 1, 0, 2 * window + 1)
      if not count then
        for _, k in ipairs(taken) do dict:incr(k, -1) end
        if conf.fault_tolerant then weir.log.err("rate-limiting: counter update failed: ", err) return end
        error("rate-limiting: counter update failed: " .. tostring(err))
      end
      taken[#taken + 1] = key
      local prev = tonumber(dict:get(base .. period.name .. "|" .. (start - window))) or 0
      local elapsed = now - start
      local estimate = prev * (window - elapsed) / window + count
      local state = { name = period.name, limit = limit, window = window, prev = prev, count = count,
                      elapsed = elapsed, remaining = max(0, floor(limit - estimate)) }
      states[#states + 1] = state
      if estimate > limit and not refused then refused = state end
    end
  end
  if #states == 0 then
    error("rate-limiting: configure at least one of second, minute, hour, day")
  end
  if refused then
    for _, k in ipairs(taken) do dict:incr(k, -1) end
  end

  if not conf.hide_client_headers then
    -- The most restrictive period speaks for the RateLimit-* headers.
    local tightest = refused or states[1]
    for _, s in ipairs(states) do
      if s.remaining < tightest.remaining then tightest = s end
    end
    for _, s in ipairs(states) do
      local suffix = s.name:sub(1, 1):upper() .. s.name:sub(2)
      weir.response.set_header("x-ratelimit-limit-" .. suffix, s.limit)
      weir.response.set_header("x-ratelimit-remaining-" .. suffix, refused and 0 or s.remaining)
    end
    weir.response.set_header("ratelimit-limit", tightest.limit)
    weir.response.set_header("ratelimit-remaining", refused and 0 or tightest.remaining)
    weir.response.set_header("ratelimit-reset", max(1, ceil(tightest.window - tightest.elapsed)))
  end

  if refused then
    local s = refused
    local wait = retry_after(s.limit, s.window, s.prev, s.count - 1, s.elapsed)
    local headers = { ["retry-after"] = tostring(max(1, ceil(wait))) }
    return conf.error_code, { message = conf.error_message }, headers
  end
end

return RateLimiting
