-- cors: answers CORS preflight requests at the gateway and adds the CORS
-- response headers to actual requests from allowed origins.
local weir = require "weir"

local CORS = { PRIORITY = 2000, VERSION = "1.0.0" }

-- Per config table: { any = bool, exact = { [lower origin] = true }, patterns = { lua pattern } }.
local compiled = setmetatable({}, { __mode = "k" })

local function compile(conf)
  local c = compiled[conf]
  if c then return c end
  c = { any = #conf.origins == 0, exact = {}, patterns = {} }
  for _, origin in ipairs(conf.origins) do
    if origin == "*" then
      c.any = true
    elseif origin:find("*", 1, true) then
      local escaped = origin:lower():gsub("[%^%$%(%)%%%.%[%]%+%-%?]", "%%%0")
      c.patterns[#c.patterns + 1] = "^" .. escaped:gsub("%*", "[%%w%%-%%.]*") .. "$"
    else
      c.exact[origin:lower()] = true
    end
  end
  compiled[conf] = c
  return c
end

-- The Access-Control-Allow-Origin value for this request's Origin, or nil.
local function allowed_origin(conf, origin)
  local c = compile(conf)
  if c.any then
    -- '*' cannot be combined with credentials: echo the origin instead.
    if conf.credentials then return origin end
    return "*"
  end
  if not origin then return nil end
  local lower = origin:lower()
  if c.exact[lower] then return origin end
  for _, pattern in ipairs(c.patterns) do
    if lower:find(pattern) then return origin end
  end
  return nil
end

function CORS:request(conf, ctx)
  local origin = weir.request.get_header("origin")
  local allow = allowed_origin(conf, origin)
  local preflight = weir.request.get_method() == "OPTIONS"
    and weir.request.get_header("access-control-request-method") ~= nil
  if preflight and not conf.preflight_continue then
    local headers = { vary = "Origin" }
    if allow then
      headers["access-control-allow-origin"] = allow
      headers["access-control-allow-methods"] = table.concat(conf.methods, ",")
      local requested = weir.request.get_header("access-control-request-headers")
      if #conf.headers > 0 then
        headers["access-control-allow-headers"] = table.concat(conf.headers, ",")
      elseif requested then
        headers["access-control-allow-headers"] = requested
      end
      if conf.max_age then headers["access-control-max-age"] = conf.max_age end
      if conf.credentials then headers["access-control-allow-credentials"] = "true" end
    end
    return 204, nil, headers
  end
  ctx.cors_allow_origin = allow
end

function CORS:response(conf, ctx)
  local allow = ctx.cors_allow_origin
  if not allow then return end
  weir.response.set_header("access-control-allow-origin", allow)
  if allow ~= "*" then weir.response.add_header("vary", "Origin") end
  if conf.credentials then weir.response.set_header("access-control-allow-credentials", "true") end
  if #conf.exposed_headers > 0 then
    weir.response.set_header("access-control-expose-headers", table.concat(conf.exposed_headers, ","))
  end
end

return CORS
