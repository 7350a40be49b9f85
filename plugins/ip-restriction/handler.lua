-- ip-restriction: refuses clients by address, with allow and deny lists of
-- IPv4 / IPv6 CIDRs. Addresses are compared as byte strings (4 or 16 bytes);
-- an IPv4-mapped IPv6 client (::ffff:a.b.c.d) counts as IPv4.
local weir = require "weir"

local IPRestriction = { PRIORITY = 990, VERSION = "1.0.0" }

local function parse_ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  local bytes = {}
  for i, part in ipairs({ a, b, c, d }) do
    local n = tonumber(part)
    if n > 255 or (#part > 1 and part:sub(1, 1) == "0") then return nil end
    bytes[i] = n
  end
  return string.char(table.unpack(bytes))
end

local function parse_groups(text, out)
  if text == "" then return true end
  for group in (text .. ":"):gmatch("([^:]*):") do
    if not group:match("^%x%x?%x?%x?$") then return false end
    local n = tonumber(group, 16)
    out[#out + 1] = n >> 8
    out[#out + 1] = n & 0xff
  end
  return true
end

local function parse_ipv6(s)
  s = s:gsub("%%.*$", "")                 -- zone id
  local tail4
  local head, v4 = s:match("^(.*:)(%d+%.%d+%.%d+%.%d+)$")
  if head then
    tail4 = parse_ipv4(v4)
    if not tail4 then return nil end
    s = head .. "0:0"                     -- placeholder groups, replaced below
  end
  local left, right = s, nil
  local dbl = s:find("::", 1, true)
  if dbl then
    left, right = s:sub(1, dbl - 1), s:sub(dbl + 2)
    if right:find("::", 1, true) then return nil end
  end
  local lb, rb = {}, {}
  if not parse_groups(left, lb) then return nil end
  if right and not parse_groups(right, rb) then return nil end
  local missing = 16 - #lb - #rb
  if (right and missing < 2) or (not right and missing ~= 0) then return nil end
  local bytes = lb
  for _ = 1, missing do bytes[#bytes + 1] = 0 end
  for _, v in ipairs(rb) do bytes[#bytes + 1] = v end
  local raw = string.char(table.unpack(bytes))
  if tail4 then raw = raw:sub(1, 12) .. tail4 end
  return raw
end

local MAPPED_PREFIX = string.rep("\0", 10) .. "\255\255"

-- Bytes of an address (4 for IPv4, including IPv4-mapped IPv6; else 16), or nil.
local function parse_address(s)
  if s:find(":", 1, true) then
    local raw = parse_ipv6(s)
    if raw and raw:sub(1, 12) == MAPPED_PREFIX then return raw:sub(13) end
    return raw
  end
  return parse_ipv4(s)
end

local function parse_cidr(text)
  local addr, bits = text:match("^([^/]+)/(%d+)$")
  addr = addr or text
  local raw = parse_address(addr)
  if not raw then return nil end
  local width = #raw * 8
  local prefix = bits and tonumber(bits) or width
  if bits and #raw == 4 and addr:find(":", 1, true) then
    -- An IPv4-mapped IPv6 CIDR (::ffff:10.0.0.0/104) is matched as IPv4.
    prefix = prefix - 96
    if prefix < 0 then return nil end
  end
  if prefix > width then return nil end
  return { raw = raw, prefix = prefix }
end

local function matches(cidr, raw)
  if #cidr.raw ~= #raw then return false end
  local full = cidr.prefix // 8
  if cidr.raw:sub(1, full) ~= raw:sub(1, full) then return false end
  local rest = cidr.prefix % 8
  if rest == 0 then return true end
  local mask = (0xff << (8 - rest)) & 0xff
  return (cidr.raw:byte(full + 1) & mask) == (raw:byte(full + 1) & mask)
end

-- Parsed lists per config table (built once per Lua state).
local parsed = setmetatable({}, { __mode = "k" })

local function compile(conf)
  local lists = parsed[conf]
  if lists then return lists end
  lists = {}
  for _, name in ipairs({ "allow", "deny" }) do
    local list = {}
    for i, text in ipairs(conf[name] or {}) do
      local cidr = parse_cidr(text)
      if not cidr then
        error("ip-restriction: " .. name .. "[" .. (i - 1) .. "]: not an IPv4/IPv6 address or CIDR: " .. text)
      end
      list[#list + 1] = cidr
    end
    lists[name] = list
  end
  parsed[conf] = lists
  return lists
end

local function any(list, raw)
  for _, cidr in ipairs(list) do
    if matches(cidr, raw) then return true end
  end
  return false
end

function IPRestriction:request(conf, ctx)
  local lists = compile(conf)
  local ip = weir.client.get_ip()
  local raw = ip and parse_address(ip)
  local refused
  if not raw then
    refused = true                          -- unknown peer (e.g. a Unix socket): not on any list
  elseif any(lists.deny, raw) then
    refused = true
  elseif #lists.allow > 0 and not any(lists.allow, raw) then
    refused = true
  end
  if refused then return conf.status, { message = conf.message } end
end

-- Exposed for tests and other plugins.
IPRestriction.parse_address = parse_address
IPRestriction.parse_cidr = parse_cidr
IPRestriction.matches = matches

return IPRestriction
