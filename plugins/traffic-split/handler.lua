-- traffic-split: sends requests that match a rule (header or cookie, exact
-- or regular expression), or else a weighted share of requests, to another
-- configured upstream (canary releases). Match rules win over weights.
local weir = require "weir"

local TrafficSplit = { PRIORITY = 799, VERSION = "1.0.0" }

local random = math.random

-- The Cookie header as name -> value (first occurrence wins, as browsers
-- send the most specific cookie first).
local function parse_cookies(header)
  local cookies = {}
  if type(header) == "table" then header = table.concat(header, "; ") end
  for pair in header:gmatch("[^;]+") do
    local name, value = pair:match("^%s*([^=%s]+)%s*=%s*(.-)%s*$")
    if name and cookies[name] == nil then
      if value:sub(1, 1) == '"' and value:sub(-1) == '"' and #value >= 2 then value = value:sub(2, -2) end
      cookies[name] = value
    end
  end
  return cookies
end

local function holds(rule, cookies_of_request)
  for name, want in pairs(rule.headers) do
    if weir.request.get_header(name) ~= want then return false end
  end
  for name, pattern in pairs(rule.header_regex) do
    local value = weir.request.get_header(name)
    if not value or not weir.re.find(value, pattern) then return false end
  end
  if next(rule.cookies) ~= nil or next(rule.cookie_regex) ~= nil then
    local cookies = cookies_of_request()
    for name, want in pairs(rule.cookies) do
      if cookies[name] ~= want then return false end
    end
    for name, pattern in pairs(rule.cookie_regex) do
      local value = cookies[name]
      if not value or not weir.re.find(value, pattern) then return false end
    end
  end
  return true
end

-- Total weight per config table (conf is built once per Lua state).
local totals = setmetatable({}, { __mode = "k" })

local function total_weight(conf)
  local total = totals[conf]
  if not total then
    total = 0
    for _, share in ipairs(conf.split) do total = total + share.weight end
    totals[conf] = total
  end
  return total
end

local function route_to(name)
  local ok, err = weir.upstream.set_upstream(name)
  if not ok then
    -- Names are checked at config load; this means a reload raced us.
    weir.log.err("traffic-split: ", err)
  end
end

function TrafficSplit:request(conf, ctx)
  if #conf.match > 0 then
    local cookies
    local function cookies_of_request()
      if not cookies then
        local header = weir.request.get_headers()["cookie"]
        cookies = header and parse_cookies(header) or {}
      end
      return cookies
    end
    for _, rule in ipairs(conf.match) do
      if holds(rule, cookies_of_request) then
        route_to(rule.upstream)
        return
      end
    end
  end
  local total = total_weight(conf)
  if total <= 0 then return end
  -- A point in [0, 100); weights summing over 100 are scaled to 100.
  local point = random() * math.max(100, total)
  for _, share in ipairs(conf.split) do
    point = point - share.weight
    if point < 0 then
      route_to(share.upstream)
      return
    end
  end
end

return TrafficSplit
