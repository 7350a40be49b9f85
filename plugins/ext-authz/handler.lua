-- ext-authz: asks an external HTTP service whether a request may pass.
-- A 2xx answer allows it (selected answer headers go upstream); any other
-- answer denies it (status, body and selected headers go to the client).
-- A call that fails (cannot connect, times out, 5xx) follows
-- failure_mode_allow, as Envoy's ext_authz filter does.
local weir = require "weir"

local ExtAuthz = { PRIORITY = 1100, VERSION = "1.0.0" }

-- Copies `names` from the authorization response headers with `set`.
local function copy(names, from, set)
  for _, name in ipairs(names) do
    local value = from[name:lower()]
    if type(value) == "table" then
      for i, line in ipairs(value) do
        if i == 1 then set(name, line, false) else set(name, line, true) end
      end
    elseif value ~= nil then
      set(name, value, false)
    end
  end
end

local function set_upstream(name, value, again)
  if again then weir.upstream.request.add_header(name, value) else weir.upstream.request.set_header(name, value) end
end

local function set_client(name, value, again)
  if again then weir.response.add_header(name, value) else weir.response.set_header(name, value) end
end

local function failed(conf, reason)
  weir.log.warn("ext-authz: authorization call failed: ", reason)
  if conf.failure_mode_allow then
    -- Envoy's marker: the upstream can tell the request was not checked.
    weir.upstream.request.set_header("x-weir-auth-failure-mode-allowed", "true")
    return
  end
  return conf.status_on_error, { message = "authorization service unavailable", request_id = weir.request.get_id() }
end

function ExtAuthz:request(conf, ctx)
  local headers = {
    ["x-forwarded-method"] = weir.request.get_method(),
    ["x-forwarded-uri"] = weir.request.get_path() .. (function(q) return q ~= "" and "?" .. q or "" end)(weir.request.get_raw_query()),
    ["x-forwarded-host"] = weir.request.get_host(),
    ["x-forwarded-proto"] = weir.request.get_scheme(),
    ["x-forwarded-for"] = weir.client.get_ip(),
    ["x-request-id"] = weir.request.get_id(),
  }
  for _, name in ipairs(conf.request_headers) do
    local value = weir.request.get_header(name)
    if value ~= nil then headers[name:lower()] = value end
  end
  local body
  if conf.include_body > 0 then
    body = weir.request.get_body(conf.include_body)
  end

  local res, err = weir.http.request(conf.url, {
    method = conf.method, headers = headers, body = body, timeout = conf.timeout,
    ssl_verify = conf.ssl_verify, ca_file = conf.ca_file,
  })
  if not res then return failed(conf, err) end
  if res.status >= 500 or res.status < 200 then return failed(conf, "status " .. res.status) end

  if res.status >= 200 and res.status < 300 then
    copy(conf.upstream_headers, res.headers, set_upstream)
    copy(conf.client_headers_on_allow, res.headers, set_client)
    return
  end

  -- Denied: the service's answer (or the configured one) goes to the client.
  local deny = {}
  copy(conf.client_headers, res.headers, function(name, value)
    local key = name:lower()
    local existing = deny[key]
    if existing == nil then deny[key] = value
    elseif type(existing) == "table" then existing[#existing + 1] = value
    else deny[key] = { existing, value } end
  end)
  local status = conf.deny_status or res.status
  if status < 400 and status >= 300 then
    -- A redirect (to a login page) passes with its location.
    deny["location"] = deny["location"] or res.headers["location"]
  end
  local deny_body = conf.deny_body
  if deny_body == nil then
    deny_body = res.body or ""
    if deny["content-type"] == nil and res.headers["content-type"] and deny_body ~= "" then
      deny["content-type"] = res.headers["content-type"]
    end
  elseif deny["content-type"] == nil then
    deny["content-type"] = "text/plain; charset=utf-8"
  end
  return status, deny_body, deny
end

return ExtAuthz
