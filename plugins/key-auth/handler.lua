-- key-auth: authenticates a request by an API key found in a header or a
-- query argument, matched against consumers[].credentials["key-auth"][].key
-- with an indexed lookup (weir.client.identify_credential: find_credential
-- and identify in one call; identify_header_credential: the same on a
-- header's value, read in the same call).
local weir = require "weir"

-- The SDK functions used per request, looked up once (each `weir.x.y` in
-- the request path is two table reads).
local get_header, get_query_arg, get_raw_query, get_query, get_method =
  weir.request.get_header, weir.request.get_query_arg, weir.request.get_raw_query, weir.request.get_query, weir.request.get_method
local clear_header, set_query = weir.upstream.request.clear_header, weir.upstream.request.set_query
local get_consumer, identify, identify_credential = weir.client.get_consumer, weir.client.identify, weir.client.identify_credential
local identify_header_credential = weir.client.identify_header_credential

local KeyAuth = { PRIORITY = 1250, VERSION = "1.0.0" }

local function unauthorized(conf, message)
  return 401, { message = message }, { ["www-authenticate"] = 'Key realm="' .. conf.realm .. '"' }
end

-- With a query string (`has_query` false: known to have none), the key's
-- query argument removed from the request sent upstream (its header lines
-- are cleared elsewhere).
local function hide_query_key(names, n, has_query)
  if has_query == false or get_raw_query() == "" then return end
  local query = get_query()
  local changed = false
  for i = 1, n do
    local name = names[i]
    if query[name] ~= nil then query[name] = nil; changed = true end
  end
  if changed then
    if next(query) == nil then set_query(nil) else set_query(query) end
  end
end

-- The one key name's key in the query (a bare `?apikey` parses as `true`:
-- an empty key) and its consumer. `hide_header`: the name's header (absent)
-- is cleared again after the identification, as the clear after it always was.
local function query_key(only, hide_header)
  local key = get_query_arg(only)
  if key == true then key = "" end
  local consumer
  if key and key ~= "" then consumer = identify_credential("key-auth", "key", key, hide_header and only or nil) end
  return key, consumer
end

-- A request without a consumer: the 401 (an anonymous consumer was handled before).
local function refuse(conf, key)
  if not key or key == "" then return unauthorized(conf, "No API key found in request") end
  return unauthorized(conf, "Invalid authentication credentials")
end

-- The one key name of a config of the usual shape (the defaults: one name,
-- looked for in the header first, hidden, no anonymous, preflights
-- authenticated), or false: worked out on a config's first request and kept
-- in the config table itself, under a key no config field can have (a
-- NUL byte in it): a short-string field read costs ~40 instructions, a
-- weak table indexed by the config ~130. Such a config's request takes
-- the short path in KeyAuth:request (~25 fewer VM instructions than
-- reading the five fields and testing them every time).
local function usual_name_of(conf)
  local names = conf.key_names
  local only = conf.run_on_preflight and not conf.anonymous and #names == 1 and conf.key_in_header
               and conf.hide_credentials and names[1] or false
  conf["\0key-auth"] = only
  return only
end

-- The usual config's request after identify_header_credential(only, hide)
-- when it did not settle it (no consumer, or a query string to look at):
-- the general path below from there, with n == 1, in_header, hide, the
-- header cleared and no anonymous.
local function usual_rest(conf, only, consumer, value, has_query)
  local key = consumer and true or value
  local in_query = conf.key_in_query
  if not key and in_query then key, consumer = query_key(only, true) end
  if in_query then hide_query_key(conf.key_names, 1, has_query) end
  if consumer then return end
  return refuse(conf, key)
end

function KeyAuth:request(conf)
  local only = conf["\0key-auth"]
  if only == nil then only = usual_name_of(conf) end
  if only then
    -- The header's key looked up, identified and its header cleared in one
    -- SDK call; a match on a request without a query string is done.
    local consumer, value, has_query = identify_header_credential("key-auth", "key", only, true)
    if consumer and has_query == false then return end
    return usual_rest(conf, only, consumer, value, has_query)
  end

  if not conf.run_on_preflight and get_method() == "OPTIONS" then return end
  -- Another auth plugin already identified the client (multiple auth with anonymous).
  local anonymous = conf.anonymous
  if anonymous then
    local current = get_consumer()
    if current and current ~= anonymous then return end
  end

  -- The key (nil when absent; "" for a bare `?apikey`). Names are tried in
  -- order, each in the headers and then the query. Inline, with numeric
  -- loops: this runs on every request. A key's consumer is identified at
  -- once (authenticate + X-Consumer-Name, X-Anonymous-Consumer removed),
  -- and with hide_credentials the key's header cleared after that.
  local names, in_header, in_query = conf.key_names, conf.key_in_header, conf.key_in_query
  local hide = conf.hide_credentials
  local n = #names
  local key, consumer
  local has_query             -- false: the request has no query string (known from the header's call)
  if n == 1 then
    -- One name (the default, apikey): the loop below without its loop
    -- (~10 fewer VM instructions per request, with the hiding's).
    local only = names[1]
    if in_header then
      -- The header's key looked up, identified and (hide) its header
      -- cleared in one SDK call: the consumer, or nil and the header's
      -- value; then whether there is a query string (for the hiding below).
      local value
      consumer, value, has_query = identify_header_credential("key-auth", "key", only, hide)
      key = consumer and true or value
    end
    if not key and in_query then key, consumer = query_key(only, in_header and hide) end
  else
    for i = 1, n do
      local name = names[i]
      if in_header then
        key = get_header(name)
        if key then break end
      end
      if in_query then
        key = get_query_arg(name)
        if key ~= nil then
          if key == true then key = "" end
          break
        end
      end
    end
    if key and key ~= "" then consumer = identify_credential("key-auth", "key", key) end
  end
  if hide then
    -- One name's header was cleared by identify_header_credential.
    if in_header and n > 1 then for i = 1, n do clear_header(names[i]) end end
    -- No query string, nothing to strip: neither a call nor its parse into
    -- a table (nor get_raw_query's call when the header's call said so).
    if in_query then hide_query_key(names, n, has_query) end
  end

  if consumer then return end
  -- identify: authenticate + X-Consumer-Name, and X-Anonymous-Consumer
  -- set (a client cannot send it), in one SDK call.
  if anonymous then
    identify(anonymous, nil, true)
    return
  end
  return refuse(conf, key)
end

return KeyAuth
