-- The `weir` SDK: `local weir = require "weir"`.
--
-- This file is loaded once per Lua state by the Swift runtime (WeirLua),
-- which passes:
--   N  the native functions (Swift, behind C trampolines). They never raise
--      for bad input types in a way that could crash, but their messages are
--      terse; the checks here give plugin authors clear errors that point at
--      their own line (DESIGN.md "Lua bridging rules" 3).
--   S  the runtime's state table: S[1] = current phase id (0 = none),
--      S[2] = serial of the current connection-phase call (conn handles
--      compare against it), S[3] = the current request's weir.ctx table
--      (nil outside request phases). Swift writes them only when they change.
--   json, clib  the JSON module and the C helper library (crypto, time).
-- See lua/README.md for the documentation of every function.
local N, S, json, clib = ...

local type, error, tostring, select, pairs, ipairs, setmetatable, getmetatable, rawget, rawset =
  type, error, tostring, select, pairs, ipairs, setmetatable, getmetatable, rawget, rawset
local math_type, floor = math.type, math.floor

local PHASE_NAMES = { "connection", "request", "response", "body_filter", "log", "timer" }
local CONNECTION, REQUEST, RESPONSE, BODY_FILTER, LOG, TIMER = 1, 2, 3, 4, 5, 6

local function phase_name(id)
  return PHASE_NAMES[id] or "init"
end

-- Phase sets, as the documentation names them.
local function phases(...)
  local set = {}
  for i = 1, select("#", ...) do set[select(i, ...)] = true end
  return set
end
local ANY_REQUEST_PHASE = phases(REQUEST, RESPONSE, BODY_FILTER, LOG)
local ANY_PHASE = phases(CONNECTION, REQUEST, RESPONSE, BODY_FILTER, LOG, TIMER)
local REWRITE_PHASES = phases(REQUEST)
local UPSTREAM_CHOICE_PHASES = phases(CONNECTION, REQUEST)
local RESPONSE_PHASES = phases(RESPONSE, BODY_FILTER, LOG)
local RESPONSE_WRITE_PHASES = phases(REQUEST, RESPONSE)
local EXIT_PHASES = phases(REQUEST, RESPONSE)
local RESPONSE_ONLY = phases(RESPONSE)
local BODY_FILTER_ONLY = phases(BODY_FILTER)

-- Raises "<fname> is not available in the <phase> phase" at the caller's
-- line (`level`, default 3: check_phase <- SDK function <- plugin code).
local function check_phase(fname, allowed, level)
  local p = S[1]
  if not allowed[p] then
    error(fname .. " is not available in the " .. phase_name(p) .. " phase", level or 3)
  end
end

-- The hottest SDK functions are their natives, called by plugins directly
-- (no Lua wrapper call per use): the native checks the phase and its
-- arguments itself, and on anything it does not take it calls the Lua
-- fallback given here with the same arguments (CLuaShims weir_with_fallback).
-- A fallback raises the SDK's message or converts a value (a float header
-- value) and calls the plain native again. It runs one frame deeper than a
-- wrapper did (the native's C frame sits between it and the plugin), so
-- its error levels are one higher: 4 = the plugin's line.
local with_fallback = clib.with_fallback

-- `level` defaults to 4: arg_error <- check_* <- SDK function <- plugin code.
local function arg_error(fname, n, expected, got, level)
  error("bad argument #" .. n .. " to '" .. fname .. "' (" .. expected .. " expected, got " .. type(got) .. ")", level or 4)
end

-- A with_fallback native's fallback when the phase was right but no
-- request is active (called between phases, S[1] still naming the last one).
-- `level` as arg_error's (default 4: from a fallback's own body).
local function no_request(fname, level)
  error(fname .. ": no request is active (called outside a plugin phase?)", level or 4)
end

local function check_string(fname, n, v, level)
  if type(v) ~= "string" then arg_error(fname, n, "string", v, level) end
end

local function check_optional_string(fname, n, v)
  if v ~= nil and type(v) ~= "string" then arg_error(fname, n, "string or nil", v) end
end

local function check_integer(fname, n, v)
  if math_type(v) ~= "integer" and not (type(v) == "number" and v == floor(v)) then
    arg_error(fname, n, "integer", v)
  end
end

local function check_number(fname, n, v, level)
  if type(v) ~= "number" then arg_error(fname, n, "number", v, level) end
end

-- A header value may be a string, a number, or an array of those.
-- `level` as arg_error's (default 4: from an SDK function's Lua body).
local function header_value(fname, n, v, level)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  arg_error(fname, n, "string or number", v, level)
end

local weir = {}
weir.json = json

-- weir.request ----------------------------------------------------------------

local request = {}
weir.request = request

function request.get_method()
  check_phase("weir.request.get_method", ANY_REQUEST_PHASE)
  return N.req_get_method()
end

function request.get_path()
  check_phase("weir.request.get_path", ANY_REQUEST_PHASE)
  return N.req_get_path()
end

-- The native itself ("" without a query); the fallback only raises.
local native_get_raw_query = N.req_get_raw_query
request.get_raw_query = with_fallback(native_get_raw_query, function()
  check_phase("weir.request.get_raw_query", ANY_REQUEST_PHASE, 4)
  no_request("weir.request.get_raw_query")
end)

-- The raw query for get_query / get_query_arg (their phase checked).
local function raw_query(fname)
  local raw = native_get_raw_query()
  if raw == false then error(fname .. ": no request is active (called outside a plugin phase?)", 3) end
  return raw
end

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

-- Parses a query string: repeated keys become arrays; a key without "=" is true.
local function parse_query(raw, max_args)
  local args, count = {}, 0
  for pair in raw:gmatch("[^&]+") do
    count = count + 1
    if max_args and count > max_args then break end
    local k, v = pair:match("^([^=]*)=(.*)$")
    local value
    if k then k, value = unescape(k), unescape(v) else k, value = unescape(pair), true end
    local existing = args[k]
    if existing == nil then
      args[k] = value
    elseif type(existing) == "table" then
      existing[#existing + 1] = value
    else
      args[k] = { existing, value }
    end
  end
  return args
end

function request.get_query(max_args)
  check_phase("weir.request.get_query", ANY_REQUEST_PHASE)
  if max_args ~= nil then check_integer("weir.request.get_query", 1, max_args) end
  return parse_query(raw_query("weir.request.get_query"), max_args or 100)
end

function request.get_query_arg(name)
  check_phase("weir.request.get_query_arg", ANY_REQUEST_PHASE)
  check_string("weir.request.get_query_arg", 1, name)
  local v = parse_query(raw_query("weir.request.get_query_arg"))[name]
  if type(v) == "table" then return v[1] end
  return v
end

-- Hot paths (get_header, the header setters, authenticate, find_credential,
-- shared incr/get): the native checks its arguments and returns false for
-- one it does not take; only then do the checks here run, for their
-- message. A `type()` call per argument costs more than the native's check
-- (a C call that pushes the type's name), and these run on every request.
local native_get_header = N.req_get_header
request.get_header = with_fallback(native_get_header, function(name)
  check_phase("weir.request.get_header", ANY_REQUEST_PHASE, 4)
  local v = native_get_header(name)
  if v == false then arg_error("weir.request.get_header", 1, "string", name, 4) end
  return v
end)

function request.get_headers()
  check_phase("weir.request.get_headers", ANY_REQUEST_PHASE)
  return N.req_get_headers()
end

function request.get_host()
  check_phase("weir.request.get_host", ANY_REQUEST_PHASE)
  return N.req_get_host()
end

function request.get_scheme()
  check_phase("weir.request.get_scheme", ANY_REQUEST_PHASE)
  return N.req_get_scheme()
end

function request.get_id()
  check_phase("weir.request.get_id", ANY_REQUEST_PHASE)
  return N.req_get_id()
end

request.get_route = with_fallback(N.req_get_route, function()
  check_phase("weir.request.get_route", ANY_REQUEST_PHASE, 4)
  no_request("weir.request.get_route")
end)

-- get_route() and weir.client.get_consumer() in one native call: route, consumer.
request.get_route_and_consumer = with_fallback(N.req_get_route_and_consumer, function()
  check_phase("weir.request.get_route_and_consumer", ANY_REQUEST_PHASE, 4)
  no_request("weir.request.get_route_and_consumer")
end)

function request.get_body(max_bytes)
  check_phase("weir.request.get_body", REWRITE_PHASES)
  if max_bytes ~= nil then check_integer("weir.request.get_body", 1, max_bytes) end
  return N.req_get_body(max_bytes or 1048576)
end

-- weir.upstream and weir.upstream.request -------------------------------------

local upstream = {}
local upstream_request = {}
upstream.request = upstream_request
weir.upstream = upstream

-- The setters' natives take a string name and a string or integer value;
-- false means anything else: a bad name raises here, a float value is
-- written as Lua writes it (tostring) and set again.
local native_up_set_header = N.up_set_header
upstream_request.set_header = with_fallback(native_up_set_header, function(name, value)
  check_phase("weir.upstream.request.set_header", REWRITE_PHASES, 4)
  if type(name) ~= "string" then arg_error("weir.upstream.request.set_header", 1, "string", name, 4) end
  native_up_set_header(name, header_value("weir.upstream.request.set_header", 2, value, 5))
end)

function upstream_request.add_header(name, value)
  check_phase("weir.upstream.request.add_header", REWRITE_PHASES)
  check_string("weir.upstream.request.add_header", 1, name)
  N.up_add_header(name, header_value("weir.upstream.request.add_header", 2, value))
end

local native_up_clear_header = N.up_clear_header
upstream_request.clear_header = with_fallback(native_up_clear_header, function(name)
  check_phase("weir.upstream.request.clear_header", REWRITE_PHASES, 4)
  arg_error("weir.upstream.request.clear_header", 1, "string", name, 4)
end)

function upstream_request.set_path(path)
  check_phase("weir.upstream.request.set_path", REWRITE_PHASES)
  check_string("weir.upstream.request.set_path", 1, path)
  if path:sub(1, 1) ~= "/" then error("weir.upstream.request.set_path: path must start with '/'", 2) end
  N.up_set_path(path)
end

-- The upstream request as earlier plugins left it (request phase).
function upstream_request.get_headers()
  check_phase("weir.upstream.request.get_headers", REWRITE_PHASES)
  return N.up_get_headers()
end

function upstream_request.get_raw_query()
  check_phase("weir.upstream.request.get_raw_query", REWRITE_PHASES)
  return N.up_get_raw_query()
end

function upstream_request.get_query(max_args)
  check_phase("weir.upstream.request.get_query", REWRITE_PHASES)
  if max_args ~= nil then check_integer("weir.upstream.request.get_query", 1, max_args) end
  return parse_query(N.up_get_raw_query(), max_args or 100)
end

function upstream_request.set_query(query)
  check_phase("weir.upstream.request.set_query", REWRITE_PHASES)
  if type(query) == "table" then
    local parts = {}
    local keys = {}
    for k in pairs(query) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    local function esc(s) return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end)) end
    for _, k in ipairs(keys) do
      local v = query[k]
      if type(v) == "table" then
        for _, item in ipairs(v) do parts[#parts + 1] = esc(k) .. "=" .. esc(item) end
      elseif v == true then
        parts[#parts + 1] = esc(k)
      else
        parts[#parts + 1] = esc(k) .. "=" .. esc(v)
      end
    end
    query = table.concat(parts, "&")
  end
  check_optional_string("weir.upstream.request.set_query", 1, query)
  N.up_set_query(query)
end

function upstream_request.set_method(method)
  check_phase("weir.upstream.request.set_method", REWRITE_PHASES)
  check_string("weir.upstream.request.set_method", 1, method)
  if not method:match("^%u+$") then error("weir.upstream.request.set_method: method must be upper-case letters", 2) end
  N.up_set_method(method)
end

function upstream_request.set_body(body)
  check_phase("weir.upstream.request.set_body", REWRITE_PHASES)
  check_string("weir.upstream.request.set_body", 1, body)
  N.up_set_body(body)
end

function upstream.set_target(host, port)
  check_phase("weir.upstream.set_target", REWRITE_PHASES)
  check_string("weir.upstream.set_target", 1, host)
  check_integer("weir.upstream.set_target", 2, port)
  if port < 1 or port > 65535 then error("weir.upstream.set_target: port must be 1-65535", 2) end
  -- Only targets of configured upstreams: pools, TLS, timeouts and health
  -- exist per configured target, and an address taken from client input
  -- must not reach whatever the gateway can reach.
  if N.upstream_set_target(host, port) then return true end
  return nil, host .. ":" .. port .. " is not a target of any configured upstream"
end

-- Request phase: this request's upstream. Connection phase (tcp and tls
-- listeners): where the connection is relayed.
function upstream.set_upstream(name)
  check_phase("weir.upstream.set_upstream", UPSTREAM_CHOICE_PHASES)
  check_string("weir.upstream.set_upstream", 1, name)
  if S[1] == CONNECTION then return N.conn_set_upstream(name) end
  if N.upstream_set_upstream(name) then return true end
  return nil, "no upstream named '" .. name .. "'"
end

-- Timeouts in seconds (fractions allowed); nil leaves one unchanged.
function upstream.set_timeouts(connect, send, read)
  check_phase("weir.upstream.set_timeouts", REWRITE_PHASES)
  for i, v in ipairs({ connect or 0, send or 0, read or 0 }) do
    if type(v) ~= "number" or v < 0 then arg_error("weir.upstream.set_timeouts", i, "non-negative number or nil", v, 3) end
  end
  N.upstream_set_timeouts(connect, send, read)
end

function upstream.set_retries(n)
  check_phase("weir.upstream.set_retries", REWRITE_PHASES)
  check_integer("weir.upstream.set_retries", 1, n)
  if n < 0 then error("weir.upstream.set_retries: retries must be >= 0", 2) end
  N.upstream_set_retries(n)
end

-- weir.response ---------------------------------------------------------------

local response = {}
weir.response = response

function response.get_status()
  check_phase("weir.response.get_status", RESPONSE_PHASES)
  return N.resp_get_status()
end

function response.get_header(name)
  check_phase("weir.response.get_header", RESPONSE_PHASES)
  check_string("weir.response.get_header", 1, name)
  return N.resp_get_header(name)
end

function response.get_headers()
  check_phase("weir.response.get_headers", RESPONSE_PHASES)
  return N.resp_get_headers()
end

function response.set_status(status)
  check_phase("weir.response.set_status", RESPONSE_ONLY)
  check_integer("weir.response.set_status", 1, status)
  if status < 100 or status > 599 then error("weir.response.set_status: status must be 100-599", 2) end
  N.resp_set_status(status)
end

local native_resp_set_header = N.resp_set_header
response.set_header = with_fallback(native_resp_set_header, function(name, value)
  check_phase("weir.response.set_header", RESPONSE_WRITE_PHASES, 4)
  if type(name) ~= "string" then arg_error("weir.response.set_header", 1, "string", name, 4) end
  native_resp_set_header(name, header_value("weir.response.set_header", 2, value, 5))
end)

-- set_header for each (name, value) pair: one call (one crossing into
-- Swift) for several headers. On a pair the native does not take, the
-- pairs go through set_header's checks one by one, for the message or to
-- write a float as Lua writes it.
response.set_headers = with_fallback(N.resp_set_headers, function(...)
  check_phase("weir.response.set_headers", RESPONSE_WRITE_PHASES, 4)
  local n = select("#", ...)
  if n % 2 ~= 0 then error("weir.response.set_headers: expected name, value pairs, got " .. n .. " arguments", 3) end
  for i = 1, n, 2 do
    local name, value = select(i, ...)
    if type(name) ~= "string" then arg_error("weir.response.set_headers", i, "string", name, 4) end
    native_resp_set_header(name, header_value("weir.response.set_headers", i + 1, value, 5))
  end
end)

-- Header lines prepared once, set on many requests (a plugin's own
-- headers, rate-limiting's RateLimit-*): the names (and the values that
-- never change) are checked once here, so each set passes only the values
-- that change. `prepared:set(...)` is the native itself; on a value it does
-- not take (a float, CR/LF, the wrong count) or in the wrong phase the
-- lines go through set_header's checks one by one, for the message or to
-- write the value as set_header would.
local prepared_handles = setmetatable({}, { __mode = "k" })
local PREPARED_SET = "weir.response.prepare_headers' set"
local prepared_set = with_fallback(N.resp_set_prepared, function(self, ...)
  check_phase(PREPARED_SET, RESPONSE_WRITE_PHASES, 4)
  if not prepared_handles[self] then
    error(PREPARED_SET .. ": call it as handle:set(...) on a handle from weir.response.prepare_headers", 3)
  end
  local n = select("#", ...)
  if n ~= self.value_count then
    error(PREPARED_SET .. ": expected " .. self.value_count .. " values, got " .. n, 3)
  end
  local names, fixed, next_value = self.names, self.fixed, 0
  for i = 1, #names do
    local value = fixed[i]
    if value == false then
      next_value = next_value + 1
      value = header_value(PREPARED_SET, next_value, (select(next_value, ...)), 5)
    end
    native_resp_set_header(names[i], value)
  end
end)

-- weir.response.prepare_headers(lines) -> handle. `lines`: an array whose
-- items are a header name (its value comes with each set) or
-- { name, value } (a string or number that is the same on every set).
function response.prepare_headers(lines)
  local fname = "weir.response.prepare_headers"
  if type(lines) ~= "table" then arg_error(fname, 1, "table", lines, 3) end
  local names, fixed, value_count = {}, {}, 0
  for i = 1, #lines do
    local line, name, value = lines[i], nil, false
    if type(line) == "table" then
      name, value = line[1], line[2]
      if type(value) == "number" then value = tostring(value) end
      if type(value) ~= "string" then
        error(fname .. ": line " .. i .. ": the value of { name, value } must be a string or a number, got " .. type(line[2]), 2)
      end
    else
      name, value_count = line, value_count + 1
    end
    if type(name) ~= "string" then error(fname .. ": line " .. i .. ": the name must be a string, got " .. type(name), 2) end
    names[i], fixed[i] = name, value
  end
  local id, err = N.resp_prepare_headers(names, fixed)
  if not id then error(fname .. ": " .. err, 2) end
  -- [1]: the id, read raw by the native.
  local handle = { id, set = prepared_set, names = names, fixed = fixed, value_count = value_count }
  prepared_handles[handle] = true
  return handle
end

function response.add_header(name, value)
  check_phase("weir.response.add_header", RESPONSE_WRITE_PHASES)
  check_string("weir.response.add_header", 1, name)
  N.resp_add_header(name, header_value("weir.response.add_header", 2, value))
end

function response.clear_header(name)
  check_phase("weir.response.clear_header", RESPONSE_WRITE_PHASES)
  check_string("weir.response.clear_header", 1, name)
  N.resp_clear_header(name)
end

-- Body filter: each call of a plugin's body_filter(self, conf, ctx) sees one
-- chunk of the response body (as it streams); it may replace it.

function response.get_chunk()
  check_phase("weir.response.get_chunk", BODY_FILTER_ONLY)
  return N.resp_get_chunk()
end

function response.set_chunk(data)
  check_phase("weir.response.set_chunk", BODY_FILTER_ONLY)
  check_string("weir.response.set_chunk", 1, data)
  N.resp_set_chunk(data)
end

function response.is_last_chunk()
  check_phase("weir.response.is_last_chunk", BODY_FILTER_ONLY)
  return N.resp_is_last_chunk()
end

-- Turns (status, body, headers) into (status, body string or nil, flat
-- header list {name1, value1, name2, value2, ...}). A table body becomes
-- JSON with content-type application/json. Raises on bad values.
local function normalize_exit(fname, level, status, body, headers)
  if math_type(status) ~= "integer" or status < 100 or status > 599 then
    error(fname .. ": status must be an integer 100-599, got " .. tostring(status), level)
  end
  local flat = {}
  local has_content_type = false
  if headers ~= nil then
    if type(headers) ~= "table" then error(fname .. ": headers must be a table, got " .. type(headers), level) end
    for name, value in pairs(headers) do
      if type(name) ~= "string" then error(fname .. ": header names must be strings", level) end
      if name:lower() == "content-type" then has_content_type = true end
      if type(value) == "table" then
        for _, item in ipairs(value) do
          flat[#flat + 1] = name
          flat[#flat + 1] = tostring(item)
        end
      elseif type(value) == "string" or type(value) == "number" then
        flat[#flat + 1] = name
        flat[#flat + 1] = tostring(value)
      else
        error(fname .. ": header '" .. name .. "' must be a string, number or list, got " .. type(value), level)
      end
    end
  end
  if type(body) == "table" then
    local encoded, err = json.encode(body)
    if not encoded then error(fname .. ": cannot encode body: " .. err, level) end
    body = encoded
    if not has_content_type then
      flat[#flat + 1] = "content-type"
      flat[#flat + 1] = "application/json"
    end
  elseif body ~= nil and type(body) ~= "string" then
    error(fname .. ": body must be a string or table, got " .. type(body), level)
  end
  return status, body, flat
end

-- Ends the request chain with this response; the rest of the chain and the
-- upstream call are skipped (response and log phases still run).
function response.exit(status, body, headers)
  check_phase("weir.response.exit", EXIT_PHASES)
  local s, b, h = normalize_exit("weir.response.exit", 3, status, body, headers)
  return N.resp_exit(s, b, h)
end

-- weir.client -------------------------------------------------------------------

local client = {}
weir.client = client

function client.get_ip()
  check_phase("weir.client.get_ip", ANY_PHASE)
  return N.client_get_ip()
end

function client.get_port()
  check_phase("weir.client.get_port", ANY_PHASE)
  return N.client_get_port()
end

-- The connection's TLS session (https listeners), nil on plain connections:
-- { version, cipher, sni, alpn, client_cert = { subject, issuer, common_name,
--   fingerprint_sha256, serial, spiffe_id, not_before, not_after,
--   san = { dns = {...}, uri = {...}, ip = {...}, email = {...} } } }
-- client_cert is present only when the client sent a certificate that verified.
function client.get_tls()
  check_phase("weir.client.get_tls", ANY_PHASE)
  return N.client_get_tls()
end

client.get_consumer = with_fallback(N.client_get_consumer, function()
  check_phase("weir.client.get_consumer", ANY_REQUEST_PHASE, 4)
  no_request("weir.client.get_consumer")
end)

-- Hot path of every auth plugin: the natives themselves; their fallbacks
-- raise the message for a bad argument or the wrong phase.
local function check_consumer_args(fname, consumer, credential)
  check_phase(fname, REWRITE_PHASES, 5)
  if type(consumer) ~= "string" then arg_error(fname, 1, "string", consumer, 5) end
  if credential ~= nil and type(credential) ~= "string" then arg_error(fname, 2, "string or nil", credential, 5) end
  no_request(fname, 5)
end

client.authenticate = with_fallback(N.client_authenticate, function(consumer, credential)
  check_consumer_args("weir.client.authenticate", consumer, credential)
end)

-- authenticate + the upstream request's X-Consumer-Name (the consumer)
-- and X-Anonymous-Consumer ("true" when `anonymous`, else removed: a
-- client must not be able to send it), in one call.
client.identify = with_fallback(N.client_identify, function(consumer, credential)
  check_consumer_args("weir.client.identify", consumer, credential)
end)

-- The fallbacks of find_credential and identify_credential (a helper one
-- frame deeper than the fallback: every level is one more).
-- (`hide`: identify_credential's optional fourth argument; nil for find_credential.)
local function check_credential_args(fname, phases, plugin, field, value, hide)
  check_phase(fname, phases, 5)
  check_string(fname, 1, plugin, 6)
  check_string(fname, 2, field, 6)
  check_string(fname, 3, value, 6)
  if hide ~= nil and type(hide) ~= "string" then arg_error(fname, 4, "string or nil", hide, 5) end
  no_request(fname, 5)
end

-- Indexed lookup in consumers[].credentials[plugin] (see SDKConsumers.swift).
client.find_credential = with_fallback(N.client_find_credential, function(plugin, field, value)
  check_credential_args("weir.client.find_credential", ANY_PHASE, plugin, field, value)
end)

-- find_credential, and when it finds one, identify(consumer, plugin): a
-- key-style auth plugin's lookup and identification in one call (request
-- phase); with `hide`, then upstream.request.clear_header(hide), found or
-- not. Returns as find_credential.
client.identify_credential = with_fallback(N.client_identify_credential, function(plugin, field, value, hide)
  check_credential_args("weir.client.identify_credential", REWRITE_PHASES, plugin, field, value, hide)
end)

-- identify_credential(plugin, field, value) with the value of request
-- header `name` (none looked up when it is absent or empty), then with
-- `hide` clear_header(name) upstream: key-auth's header key in one call.
-- Returns as find_credential on a match, else nil and the header's value
-- (nil when absent); then whether the request has a query string
-- (get_raw_query() ~= "").
client.identify_header_credential = with_fallback(N.client_identify_header_credential, function(plugin, field, name, hide)
  local fname = "weir.client.identify_header_credential"
  check_phase(fname, REWRITE_PHASES, 4)
  check_string(fname, 1, plugin, 5)
  check_string(fname, 2, field, 5)
  check_string(fname, 3, name, 5)
  if hide ~= nil and type(hide) ~= "boolean" then arg_error(fname, 4, "boolean or nil", hide, 4) end
  no_request(fname)
end)

-- Whether `name` is a configured consumer (consumers[].name); a hash lookup.
function client.is_consumer(name)
  check_phase("weir.client.is_consumer", ANY_PHASE)
  check_string("weir.client.is_consumer", 1, name)
  return N.client_is_consumer(name)
end

-- The authenticated consumer's consumers[].groups (a list), or nil when no
-- consumer has been identified.
function client.get_consumer_groups()
  check_phase("weir.client.get_consumer_groups", ANY_REQUEST_PHASE)
  local consumer = N.client_get_consumer()
  if not consumer then return nil end
  return N.client_consumer_groups(consumer)
end

-- weir.log ------------------------------------------------------------------------

local log = {}
weir.log = log

local function log_args(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return table.concat(parts, " ")
end

-- Levels: 0 debug, 1 info, 2 warn, 3 err.
function log.debug(...) N.log(0, log_args(...)) end
function log.info(...) N.log(1, log_args(...)) end
function log.warn(...) N.log(2, log_args(...)) end
function log.err(...) N.log(3, log_args(...)) end

local LOG_ONLY = phases(LOG)
-- The finished request's access record (fields of the JSON access log plus
-- the consumer), or nil outside the data path. Log phase only: before it,
-- status, sizes and durations are not final.
function log.serialize()
  check_phase("weir.log.serialize", LOG_ONLY)
  return N.log_serialize()
end

-- The same record as one JSON object (plus "time", ISO 8601), encoded in
-- Swift: for exporters that ship it as it is.
function log.serialize_json()
  check_phase("weir.log.serialize_json", LOG_ONLY)
  return N.log_serialize_json()
end

-- weir.re ---------------------------------------------------------------------

-- Regular expressions (Swift Regex syntax, PCRE-like), for what Lua patterns
-- cannot say (alternation, counted repetition). Compiled once per state.
local re = {}
weir.re = re

function re.find(subject, pattern)
  check_string("weir.re.find", 1, subject)
  check_string("weir.re.find", 2, pattern)
  return N.re_find(subject, pattern)
end

-- weir.shared -----------------------------------------------------------------

local shared_dict = {}
shared_dict.__index = shared_dict

local function check_dict(self, fname, level)
  if getmetatable(self) ~= shared_dict then error(fname .. ": call it as dict:" .. fname:match("[^.:]+$") .. "(...)", level or 3) end
end

local function check_value(fname, n, v)
  local t = type(v)
  if t ~= "string" and t ~= "number" and t ~= "boolean" then arg_error(fname, n, "string, number or boolean", v) end
end

local function check_ttl(fname, n, ttl, level)
  if ttl ~= nil and (type(ttl) ~= "number" or ttl < 0) then arg_error(fname, n, "non-negative number or nil", ttl, level) end
end

-- Every dictionary handle (see `dicts`): `is_dict[self]` checks the
-- method call without a getmetatable() call (any self indexes a table).
local is_dict = setmetatable({}, { __mode = "k" })

-- Hot path: the native returns false for a key that is not a string (a
-- stored false is checked here too, rarely).
local native_shared_get = N.shared_get
function shared_dict:get(key)
  if not is_dict[self] then check_dict(self, "weir.shared.get") end
  local v = native_shared_get(self.id, key)
  if v == false then check_string("weir.shared.get", 1, key) end
  return v
end

function shared_dict:set(key, value, ttl)
  check_dict(self, "weir.shared.set")
  check_string("weir.shared.set", 1, key)
  if value == nil then return N.shared_delete(self.id, key) end
  check_value("weir.shared.set", 2, value)
  check_ttl("weir.shared.set", 3, ttl)
  return N.shared_set(self.id, key, value, ttl or 0)
end

function shared_dict:add(key, value, ttl)
  check_dict(self, "weir.shared.add")
  check_string("weir.shared.add", 1, key)
  check_value("weir.shared.add", 2, value)
  check_ttl("weir.shared.add", 3, ttl)
  return N.shared_add(self.id, key, value, ttl or 0)
end

-- Hot path (rate limiters, counters): the native takes a string key, a
-- number delta, a number or nil init and a non-negative ttl, and returns
-- false for anything else; then this says which (`level` 6 blames the
-- caller of incr / incr_get from their fallbacks, which run under the
-- native's C frame).
local native_shared_incr = N.shared_incr
local function check_incr_args(fname, key, delta, init, init_ttl, level)
  check_string(fname, 1, key, level)
  check_number(fname, 2, delta, level)
  if init ~= nil then check_number(fname, 3, init, level) end
  check_ttl(fname, 4, init_ttl, level)
end

-- dict:incr is the native itself (no Lua call per use): it takes the
-- dictionary's table as its first argument and defaults delta to 1 and
-- init_ttl to 0. Anything it does not take (not a dictionary, a bad
-- argument) comes here, which raises the message.
shared_dict.incr = with_fallback(N.shared_dict_incr, function(self, key, delta, init, init_ttl)
  if not is_dict[self] then check_dict(self, "weir.shared.incr", 4) end
  local v, err = native_shared_incr(self.id, key, delta or 1, init, init_ttl or 0)
  if v == false then check_incr_args("weir.shared.incr", key, delta or 1, init, init_ttl, 6) end
  return v, err
end)

-- incr, then the value of another key, in one call into Swift (a sliding
-- window's current and previous counters): value, other (nil when absent),
-- or nil, err as incr. Like incr, the native itself (N.shared_dict_incr_get,
-- which also requires other_key to be a string); this fallback raises the
-- message for what it does not take.
shared_dict.incr_get = with_fallback(N.shared_dict_incr_get, function(self, key, delta, init, init_ttl, other_key)
  if not is_dict[self] then check_dict(self, "weir.shared.incr_get", 4) end
  local v, other = native_shared_incr(self.id, key, delta or 1, init, init_ttl or 0, other_key)
  if v == false then
    check_incr_args("weir.shared.incr_get", key, delta or 1, init, init_ttl, 6)
    check_string("weir.shared.incr_get", 5, other_key, 5)
  end
  return v, other
end)

-- A sliding window's count and decision in one call (rate-limiting's
-- policy local): incr_get(key, 1, 0, ttl, prev_key), then the estimate of
-- the last `window` seconds, prev * (window - elapsed) / window + count
-- (prev 0 when absent). Within `limit`: the remaining count,
-- (limit - estimate) // 1 | 0. Over it: the increment taken back
-- (dict:incr(key, -1)) and false, count (this request's included), prev.
-- nil, err as incr when the counter cannot be used. With a prepared header
-- set and its values after ttl (request and response phases), an admitted
-- request's headers:set(values...) is made in the same call, each `true`
-- among the values standing for the remaining count (nil headers: no set).
-- The native (N.shared_dict_incr_sliding) does it for integer counters,
-- window and limit (at most 2^53), a finite elapsed and integer (or true)
-- values; this fallback does the same in Lua for anything else, and raises
-- the message for bad arguments before anything is counted.
local function finite(x)
  return type(x) == "number" and x == x and x ~= math.huge and x ~= -math.huge
end

local function with_remaining(r, ...)
  local values = table.pack(...)
  for i = 1, values.n do if values[i] == true then values[i] = r end end
  return table.unpack(values, 1, values.n)
end

shared_dict.incr_sliding = with_fallback(N.shared_dict_incr_sliding, function(self, key, prev_key, window, elapsed, limit, ttl, headers, ...)
  local fname = "weir.shared.incr_sliding"
  if not is_dict[self] then check_dict(self, fname, 4) end
  check_string(fname, 1, key, 5)
  check_string(fname, 2, prev_key, 5)
  check_number(fname, 3, window, 5)
  -- The estimate divides by it: zero or less (or NaN) is refused here.
  if not (window > 0) then arg_error(fname, 3, "positive window", window, 4) end
  -- The estimate and the remaining count are made from these: NaN or an
  -- infinity would count the request, then fail `| 0` (no integer) or decide wrongly.
  if not finite(elapsed) then arg_error(fname, 4, "finite number", elapsed, 4) end
  if not finite(limit) then arg_error(fname, 5, "finite number", limit, 4) end
  check_ttl(fname, 6, ttl, 5)
  if headers ~= nil then
    check_phase(fname, RESPONSE_WRITE_PHASES, 4)
    if not prepared_handles[headers] then
      error(fname .. ": argument #7 must be a handle from weir.response.prepare_headers (or nil)", 3)
    end
    local n = select("#", ...)
    if n ~= headers.value_count then
      error(fname .. ": the prepared set takes " .. headers.value_count .. " values, got " .. n, 3)
    end
  end
  local count, prev = self:incr_get(key, 1, 0, ttl, prev_key)
  if not count then return nil, prev end
  if not prev then prev = 0 end
  local e = prev * (window - elapsed) / window + count
  if not (e > limit) then
    local r = (limit - e) // 1 | 0
    if headers ~= nil then headers:set(with_remaining(r, ...)) end
    return r
  end
  self:incr(key, -1)
  return false, count, prev
end)

function shared_dict:delete(key)
  check_dict(self, "weir.shared.delete")
  check_string("weir.shared.delete", 1, key)
  N.shared_delete(self.id, key)
end

-- A dictionary found once is kept in `dicts`, which is weir.shared's
-- __index *table*: later `weir.shared.<name>` reads are resolved by the VM
-- without a function call, and weir.shared itself stays empty, so its
-- __newindex still refuses writes. Dictionaries are fixed for the life of a
-- Lua state (a config change makes a new generation).
local dicts = setmetatable({}, {
  __index = function(t, name)
    if type(name) ~= "string" then return nil end
    local id = N.shared_id(name)
    if not id then return nil end
    -- The id also at [1]: dict:incr / incr_get (natives) read it there
    -- raw with one lua_rawgeti (by the key "id" the native first had to
    -- intern the key: ~125 instructions more per call).
    local d = setmetatable({ id, name = name, id = id }, shared_dict)
    -- The methods also as the handle's own fields: `dict:incr(...)` is then
    -- one table read, not a miss and a read through the metatable's __index.
    for method, fn in pairs(shared_dict) do
      if method ~= "__index" then rawset(d, method, fn) end
    end
    is_dict[d] = true
    rawset(t, name, d)
    return d
  end,
})
weir.shared = setmetatable({}, {
  __index = dicts,
  __newindex = function() error("weir.shared is read-only; dictionaries are declared in the config", 2) end,
})

-- weir.time, weir.sleep -------------------------------------------------------

weir.time = {
  now = clib.time_now,
  monotonic = clib.time_monotonic,
}

-- Suspends the current plugin for `seconds` without blocking the event loop.
function weir.sleep(seconds)
  check_phase("weir.sleep", ANY_PHASE)
  check_number("weir.sleep", 1, seconds)
  if seconds < 0 then error("weir.sleep: seconds must be >= 0", 2) end
  return N.sleep(seconds)
end

-- weir.http ------------------------------------------------------------------

local http = {}
weir.http = http

-- Async outbound HTTP/1.1 over http:// or https://, on pooled keep-alive
-- connections. opts: method ("GET"), headers ({ name = value | {values} }),
-- body (string), timeout (seconds, default 5), max_body (bytes, default
-- 1 MiB), ssl_verify (https: check the certificate, default true), ca_file
-- (https: PEM file of trusted CAs, default the system's), keepalive (false:
-- one connection for this call, closed after it). Returns
-- { status = n, headers = { name = value | {values} }, body = "..." }
-- or nil, err.
function http.request(url, opts)
  check_phase("weir.http.request", ANY_PHASE)
  check_string("weir.http.request", 1, url)
  opts = opts or {}
  if type(opts) ~= "table" then arg_error("weir.http.request", 2, "table or nil", opts, 3) end
  local method = opts.method or "GET"
  if type(method) ~= "string" or not method:match("^%u+$") then
    error("weir.http.request: method must be upper-case letters", 2)
  end
  local flat = {}
  if opts.headers ~= nil then
    if type(opts.headers) ~= "table" then error("weir.http.request: headers must be a table", 2) end
    for name, value in pairs(opts.headers) do
      if type(value) == "table" then
        for _, item in ipairs(value) do flat[#flat + 1] = name; flat[#flat + 1] = tostring(item) end
      else
        flat[#flat + 1] = name; flat[#flat + 1] = tostring(value)
      end
    end
  end
  if opts.body ~= nil and type(opts.body) ~= "string" then error("weir.http.request: body must be a string", 2) end
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    error("weir.http.request: timeout must be a positive number of seconds", 2)
  end
  if opts.max_body ~= nil and math_type(opts.max_body) ~= "integer" then
    error("weir.http.request: max_body must be an integer", 2)
  end
  if opts.ssl_verify ~= nil and type(opts.ssl_verify) ~= "boolean" then
    error("weir.http.request: ssl_verify must be a boolean", 2)
  end
  if opts.ca_file ~= nil and type(opts.ca_file) ~= "string" then error("weir.http.request: ca_file must be a string", 2) end
  if opts.keepalive ~= nil and type(opts.keepalive) ~= "boolean" then
    error("weir.http.request: keepalive must be a boolean", 2)
  end
  return N.http_request(url, method, flat, opts.body, opts.timeout, opts.max_body, opts.ssl_verify, opts.ca_file,
                        opts.keepalive)
end

-- weir.timer -----------------------------------------------------------------

-- Runs fn() once after `delay` seconds, in its own coroutine (it may call
-- async functions such as weir.sleep), under the usual instruction budget.
-- Errors are logged with the plugin's name. Timers of a runtime that is
-- stopped (reload) before they fire are cancelled.
local timer = {}
weir.timer = timer

function timer.at(delay, fn)
  check_phase("weir.timer.at", ANY_PHASE)
  check_number("weir.timer.at", 1, delay)
  if delay < 0 then error("weir.timer.at: delay must be >= 0", 2) end
  if type(fn) ~= "function" then arg_error("weir.timer.at", 2, "function", fn, 3) end
  return N.timer_start(delay, fn, false)
end

-- Runs fn() every `interval` seconds (the next run is scheduled
-- when the previous one ends) until the runtime shuts down.
function timer.every(interval, fn)
  check_phase("weir.timer.every", ANY_PHASE)
  check_number("weir.timer.every", 1, interval)
  if interval <= 0 then error("weir.timer.every: interval must be > 0", 2) end
  if type(fn) ~= "function" then arg_error("weir.timer.every", 2, "function", fn, 3) end
  return N.timer_start(interval, fn, true)
end

-- weir.metrics ----------------------------------------------------------------

local metrics = {}
weir.metrics = metrics

-- Adds n (default 1) to this plugin's counter `event`, shown on /metrics as
-- weir_plugin_events_total{plugin="<plugin>",event="<event>"}.
function metrics.count(event, n)
  check_phase("weir.metrics.count", ANY_PHASE)
  check_string("weir.metrics.count", 1, event)
  if n ~= nil then check_integer("weir.metrics.count", 2, n) end
  N.metrics_count(event, n and floor(n) or 1)
end

-- weir.batch ------------------------------------------------------------------

-- A bounded queue per Lua state (so per event loop) whose items are sent in
-- batches from timers, never from the request's own path: push() only
-- appends (or drops and counts when full), the sending, waiting and retrying
-- happen in timer coroutines. Used by http-log and tracing.
local batch = {}
weir.batch = batch

local BatchQueue = {}
BatchQueue.__index = BatchQueue

-- Every queue of this Lua state (weak keys: a dropped queue is not kept), so
-- a reload that retires the state can send what they hold (flush_batches).
local all_queues = setmetatable({}, { __mode = "k" })
-- Set once the state's generation is retired: every flush then empties its
-- queue, and a push schedules one at once (requests still finishing on the
-- old generation log into it).
local retiring = false

local function positive(fname, opts, key, default)
  local v = opts[key]
  if v == nil then return default end
  if type(v) ~= "number" or v <= 0 then
    error(fname .. ": " .. key .. " must be a positive number, got " .. tostring(v), 3)
  end
  return v
end

-- opts: send(items) -> true | nil, err (called in a timer; may yield, e.g.
-- weir.http.request), batch_size (100), flush_interval (1 s), max_queued
-- (10000), retries (3), retry_delay (0.5 s, doubled per retry), name (logs).
function batch.new(opts)
  if type(opts) ~= "table" then arg_error("weir.batch.new", 1, "table", opts, 3) end
  if type(opts.send) ~= "function" then error("weir.batch.new: opts.send must be a function", 2) end
  local retries = opts.retries or 3
  if math_type(retries) ~= "integer" or retries < 0 then
    error("weir.batch.new: retries must be an integer >= 0, got " .. tostring(retries), 2)
  end
  local queue = setmetatable({
    send = opts.send,
    name = tostring(opts.name or "batch"),
    metric = tostring(opts.metric or "batch"),
    batch_size = floor(positive("weir.batch.new", opts, "batch_size", 100)),
    flush_interval = positive("weir.batch.new", opts, "flush_interval", 1),
    max_queued = floor(positive("weir.batch.new", opts, "max_queued", 10000)),
    retries = retries,
    retry_delay = positive("weir.batch.new", opts, "retry_delay", 0.5),
    items = {}, head = 1, tail = 0,
    dropped = 0, sent = 0, failed_batches = 0, batches = 0,
    reported_dropped = 0, flushing = false, soon = false, ticking = false,
  }, BatchQueue)
  all_queues[queue] = true
  return queue
end

-- Appends an item. Returns true, or false when the queue is full (the item
-- is dropped and counted). Never waits. Any phase (not at load time).
function BatchQueue:push(item)
  if item == nil then error("weir.batch: cannot push nil", 2) end
  if not self.ticking then
    -- Timers cannot be started at load time: the first push starts them.
    self.ticking = true
    timer.every(self.flush_interval, function() self:flush(false) end)
  end
  if self.tail - self.head + 1 >= self.max_queued then
    self.dropped = self.dropped + 1
    N.metrics_count(self.metric .. "_dropped", 1)
    return false
  end
  self.tail = self.tail + 1
  self.items[self.tail] = item
  if (retiring or self.tail - self.head + 1 >= self.batch_size) and not self.flushing and not self.soon then
    self.soon = true
    timer.at(0, function() self.soon = false; self:flush(true) end)
  end
  return true
end

function BatchQueue:queued() return self.tail - self.head + 1 end

-- Counters since the queue was made: queued, dropped (queue full or retries
-- exhausted), sent (items), batches (sent), failed_batches.
function BatchQueue:stats()
  return { queued = self:queued(), dropped = self.dropped, sent = self.sent,
           batches = self.batches, failed_batches = self.failed_batches }
end

local function take(self, n)
  local out = table.move(self.items, self.head, self.head + n - 1, 1, {})
  for i = self.head, self.head + n - 1 do self.items[i] = nil end
  self.head = self.head + n
  if self.head > self.tail then self.head, self.tail = 1, 0 end
  return out
end

-- Sends what is queued in batches (only full batches when `full_only`).
-- One flush at a time per queue; runs in a timer coroutine.
function BatchQueue:flush(full_only)
  if self.flushing then return end
  self.flushing = true
  local ok, err = pcall(function()
    while self:queued() > 0 and (not full_only or retiring or self:queued() >= self.batch_size) do
      local items = take(self, math.min(self.batch_size, self:queued()))
      local delay, sent_ok, send_err = self.retry_delay, nil, nil
      for attempt = 0, self.retries do
        local called, result, e = pcall(self.send, items)
        if called and result then sent_ok = true break end
        send_err = called and (e or "send returned false") or result
        if attempt < self.retries then
          weir.sleep(delay)
          delay = delay * 2
        end
      end
      if sent_ok then
        self.sent = self.sent + #items
        self.batches = self.batches + 1
        N.metrics_count(self.metric .. "_sent", #items)
      else
        self.failed_batches = self.failed_batches + 1
        self.dropped = self.dropped + #items
        N.metrics_count(self.metric .. "_dropped", #items)
        weir.log.warn(self.name .. ": batch of " .. #items .. " dropped after " .. (self.retries + 1) ..
                      " attempts: " .. tostring(send_err))
      end
    end
  end)
  self.flushing = false
  if self.dropped > self.reported_dropped then
    weir.log.warn(self.name .. ": " .. (self.dropped - self.reported_dropped) .. " items dropped (" ..
                  self.dropped .. " in total on this event loop)")
    self.reported_dropped = self.dropped
  end
  if not ok then error(err, 0) end
end

-- weir.redis -------------------------------------------------------------------

-- A handle names a Redis server (address, database, credentials, timeout);
-- commands go to the event loop's pooled, pipelined client, so connect{}
-- opens nothing and is cheap per request. Redis and network failures
-- return nil, err (never raise); wrong argument types raise here.
local redis = {}
weir.redis = redis
-- Stands for a nil reply inside arrays (pipeline results, EXEC, MGET), which
-- would otherwise end the array. Compare with `v == weir.null`.
weir.null = N.redis_null()

local native_redis_command, native_redis_pipeline = N.redis_command, N.redis_pipeline

local redis_handle = {}
redis_handle.__index = redis_handle
local redis_script = {}
redis_script.__index = redis_script
local redis_pipe = {}
redis_pipe.__index = redis_pipe

function redis.connect(opts)
  check_phase("weir.redis.connect", ANY_PHASE)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then arg_error("weir.redis.connect", 1, "table or nil", opts, 3) end
  local host = opts.host == nil and "127.0.0.1" or opts.host
  if type(host) ~= "string" or host == "" then error("weir.redis.connect: host must be a non-empty string", 2) end
  local port = opts.port == nil and 6379 or opts.port
  if math_type(port) ~= "integer" or port < 1 or port > 65535 then
    error("weir.redis.connect: port must be an integer in 1-65535", 2)
  end
  local database = opts.database == nil and 0 or opts.database
  if math_type(database) ~= "integer" or database < 0 then
    error("weir.redis.connect: database must be an integer >= 0", 2)
  end
  if opts.username ~= nil and type(opts.username) ~= "string" then error("weir.redis.connect: username must be a string", 2) end
  if opts.password ~= nil and type(opts.password) ~= "string" then error("weir.redis.connect: password must be a string", 2) end
  local timeout = opts.timeout == nil and 1 or opts.timeout
  if type(timeout) ~= "number" or not (timeout > 0) or timeout == math.huge then
    error("weir.redis.connect: timeout must be a positive number of seconds", 2)
  end
  return setmetatable({ host = host, port = port, database = database, username = opts.username,
                        password = opts.password, timeout = timeout }, redis_handle)
end

-- Error levels: arg_error <- these checks <- builder <- method <- plugin code.
local function redis_arg(fname, n, v)
  local t = type(v)
  if t ~= "string" and t ~= "number" then arg_error(fname, n, "string or number", v, 5) end
end

local function redis_key(fname, n, v)
  if type(v) ~= "string" then arg_error(fname, n, "string", v, 5) end
end

local function redis_int(fname, n, v)
  if math_type(v) ~= "integer" and not (type(v) == "number" and v == floor(v)) then
    arg_error(fname, n, "integer", v, 5)
  end
end

-- EVAL/EVALSHA argument list: name, script, #keys, keys..., args...
-- `level` is the plugin's frame as seen from here.
local function script_command(fname, level, name, script, keys, args)
  keys = keys == nil and {} or keys
  args = args == nil and {} or args
  if type(keys) ~= "table" then arg_error(fname, 2, "table or nil", keys, level + 1) end
  if type(args) ~= "table" then arg_error(fname, 3, "table or nil", args, level + 1) end
  local cmd = { name, script, #keys }
  for i = 1, #keys do
    if type(keys[i]) ~= "string" then error(fname .. ": keys[" .. i .. "] must be a string", level) end
    cmd[#cmd + 1] = keys[i]
  end
  for i = 1, #args do
    local t = type(args[i])
    if t ~= "string" and t ~= "number" then error(fname .. ": args[" .. i .. "] must be a string or number", level) end
    cmd[#cmd + 1] = args[i]
  end
  return cmd
end

-- Each builder turns a method's arguments into one command (an array);
-- the handle sends it, a pipeline queues it.
local builders = {}

function builders.command(fname, name, ...)
  redis_key(fname, 1, name)
  local cmd = { name, ... }
  for i = 2, select("#", ...) + 1 do redis_arg(fname, i, cmd[i]) end
  return cmd
end
builders.call = builders.command

function builders.get(fname, key)
  redis_key(fname, 1, key)
  return { "GET", key }
end

-- opts: ex = seconds, px = milliseconds, nx = true, xx = true.
function builders.set(fname, key, value, opts)
  redis_key(fname, 1, key)
  redis_arg(fname, 2, value)
  local cmd = { "SET", key, value }
  if opts ~= nil then
    if type(opts) ~= "table" then arg_error(fname, 3, "table or nil", opts, 4) end
    if opts.ex ~= nil then
      if type(opts.ex) ~= "number" or opts.ex ~= floor(opts.ex) or opts.ex <= 0 then error(fname .. ": ex must be a positive integer (seconds)", 3) end
      cmd[#cmd + 1] = "EX"; cmd[#cmd + 1] = opts.ex
    end
    if opts.px ~= nil then
      if type(opts.px) ~= "number" or opts.px ~= floor(opts.px) or opts.px <= 0 then error(fname .. ": px must be a positive integer (milliseconds)", 3) end
      cmd[#cmd + 1] = "PX"; cmd[#cmd + 1] = opts.px
    end
    if opts.nx then cmd[#cmd + 1] = "NX" end
    if opts.xx then cmd[#cmd + 1] = "XX" end
  end
  return cmd
end

function builders.incr(fname, key)
  redis_key(fname, 1, key)
  return { "INCR", key }
end

function builders.incrby(fname, key, amount)
  redis_key(fname, 1, key)
  redis_int(fname, 2, amount)
  return { "INCRBY", key, amount }
end

function builders.expire(fname, key, seconds)
  redis_key(fname, 1, key)
  redis_int(fname, 2, seconds)
  return { "EXPIRE", key, seconds }
end

function builders.del(fname, ...)
  local cmd = { "DEL", ... }
  if #cmd == 1 then error(fname .. ": expected at least one key", 3) end
  for i = 2, select("#", ...) + 1 do redis_key(fname, i - 1, cmd[i]) end
  return cmd
end

function builders.eval(fname, script, keys, args)
  redis_key(fname, 1, script)
  local cmd = script_command(fname, 4, "EVAL", script, keys, args)
  return cmd -- not a tail call, which would drop this frame and shift the error level
end

function builders.evalsha(fname, sha, keys, args)
  redis_key(fname, 1, sha)
  local cmd = script_command(fname, 4, "EVALSHA", sha, keys, args)
  return cmd -- not a tail call, which would drop this frame and shift the error level
end

local function check_handle(fname, self)
  if getmetatable(self) ~= redis_handle then
    error(fname .. ": call it with ':' on a handle from weir.redis.connect", 3)
  end
end

local function send(self, cmd)
  return native_redis_command(self.host, self.port, self.database, self.username, self.password, self.timeout, cmd)
end

for name, build in pairs(builders) do
  local hname, pname = "red:" .. name, "pipeline:" .. name
  redis_handle[name] = function(self, ...)
    check_phase(hname, ANY_PHASE)
    check_handle(hname, self)
    return send(self, build(hname, ...))
  end
  redis_pipe[name] = function(self, ...)
    if getmetatable(self) ~= redis_pipe then error(pname .. ": call it with ':' on the pipeline object", 2) end
    if self.done then error(pname .. ": the pipeline was already sent (use it only inside its function)", 2) end
    self.commands[#self.commands + 1] = build(pname, ...)
  end
end

-- Queues the commands fn(p) makes and sends them in one round trip.
-- Returns an array with one entry per command (a reply, weir.null for a nil
-- reply, or {false, "ERR ..."} for an error reply), or nil, err when the
-- round trip failed (timeout, connection).
function redis_handle:pipeline(fn)
  check_phase("red:pipeline", ANY_PHASE)
  check_handle("red:pipeline", self)
  if type(fn) ~= "function" then arg_error("red:pipeline", 1, "function", fn, 3) end
  local p = setmetatable({ commands = {} }, redis_pipe)
  fn(p)
  p.done = true
  if #p.commands == 0 then return {} end
  return native_redis_pipeline(self.host, self.port, self.database, self.username, self.password, self.timeout, p.commands)
end

-- A Lua script run with EVALSHA (one round trip once the server has it),
-- falling back to EVAL when the server answers NOSCRIPT.
function redis_handle:script(source)
  check_phase("red:script", ANY_PHASE)
  check_handle("red:script", self)
  if type(source) ~= "string" then arg_error("red:script", 1, "string", source, 3) end
  return setmetatable({ handle = self, source = source, sha1 = N.redis_sha1(source) }, redis_script)
end

function redis_script:run(keys, args)
  check_phase("script:run", ANY_PHASE)
  if getmetatable(self) ~= redis_script then error("script:run: call it with ':' on a script from red:script", 2) end
  local cmd = script_command("script:run", 3, "EVALSHA", self.sha1, keys, args)
  local res, err = send(self.handle, cmd)
  if res == nil and type(err) == "string" and err:sub(1, 8) == "NOSCRIPT" then
    cmd[1], cmd[2] = "EVAL", self.source
    return send(self.handle, cmd)
  end
  return res, err
end

-- weir.crypto -----------------------------------------------------------------

weir.crypto = {
  sha256 = clib.sha256,
  hmac_sha256 = clib.hmac_sha256,
  base64_encode = clib.base64_encode,
  base64_decode = clib.base64_decode,
  random_bytes = clib.random_bytes,
  constant_time_equals = clib.constant_time_equals,
  hex = clib.hex,
}

local HASHES = { sha256 = true, sha384 = true, sha512 = true }
local function check_hash(fname, n, v)
  if not HASHES[v] then
    error("bad argument #" .. n .. " to '" .. fname .. "' (\"sha256\", \"sha384\" or \"sha512\" expected, got " ..
      (type(v) == "string" and ("\"" .. v .. "\"") or type(v)) .. ")", 3)
  end
end

-- HMAC with SHA-256/384/512: raw bytes.
function weir.crypto.hmac(hash, key, data)
  check_hash("weir.crypto.hmac", 1, hash)
  check_string("weir.crypto.hmac", 2, key)
  check_string("weir.crypto.hmac", 3, data)
  return N.crypto_hmac(hash, key, data)
end

-- SHA-256/384/512 digest: raw bytes.
function weir.crypto.digest(hash, data)
  check_hash("weir.crypto.digest", 1, hash)
  check_string("weir.crypto.digest", 2, data)
  return N.crypto_digest(hash, data)
end

-- PBKDF2-HMAC (RFC 8018): `length` raw bytes. Deliberately slow (it runs
-- `iterations` HMACs on the event loop): cache what it verifies.
function weir.crypto.pbkdf2(password, salt, iterations, length, hash)
  check_string("weir.crypto.pbkdf2", 1, password)
  check_string("weir.crypto.pbkdf2", 2, salt)
  check_integer("weir.crypto.pbkdf2", 3, iterations)
  check_integer("weir.crypto.pbkdf2", 4, length)
  iterations, length = math.tointeger(iterations), math.tointeger(length)
  if iterations < 1 or iterations > 10000000 then error("bad argument #3 to 'weir.crypto.pbkdf2' (iterations must be 1..10000000)", 2) end
  if length < 1 or length > 1024 then error("bad argument #4 to 'weir.crypto.pbkdf2' (length must be 1..1024)", 2) end
  if hash ~= nil then check_hash("weir.crypto.pbkdf2", 5, hash) end
  return N.crypto_pbkdf2(password, salt, iterations, length, hash)
end

local SCHEMES = { ["rsa-pkcs1-sha256"] = true, ["rsa-pkcs1-sha384"] = true, ["rsa-pkcs1-sha512"] = true,
                  ["rsa-pss-sha256"] = true, ["rsa-pss-sha384"] = true, ["rsa-pss-sha512"] = true,
                  ["ecdsa-p256-sha256"] = true, ["ecdsa-p384-sha384"] = true, ["ecdsa-p521-sha512"] = true,
                  ["ed25519"] = true }

-- Signature check. public_key: PEM text or a JWK table ({kty="RSA", n, e},
-- {kty="EC", crv="P-256"|"P-384"|"P-521", x, y} or {kty="OKP", crv="Ed25519", x}).
-- Returns true/false, or nil, err when the key cannot be used. ECDSA
-- signatures are r || s (64/96/132 bytes, as in JWS).
function weir.crypto.verify(scheme, public_key, data, signature)
  if not SCHEMES[scheme] then
    error("bad argument #1 to 'weir.crypto.verify' (rsa-pkcs1-sha256|384|512, rsa-pss-sha256|384|512, " ..
      "ecdsa-p256-sha256, ecdsa-p384-sha384, ecdsa-p521-sha512 or ed25519 expected, got " .. tostring(scheme) .. ")", 2)
  end
  if type(public_key) ~= "string" and type(public_key) ~= "table" then
    arg_error("weir.crypto.verify", 2, "PEM string or JWK table", public_key, 3)
  end
  check_string("weir.crypto.verify", 3, data)
  check_string("weir.crypto.verify", 4, signature)
  return N.crypto_verify(scheme, public_key, data, signature)
end

-- Handles --------------------------------------------------------------------
-- A handle is valid only during the phase call it was given to; using it
-- later raises a clear error (DESIGN.md "Lua bridging rules" 5).

local conn_handle = {}
conn_handle.__index = conn_handle

local function check_handle(self, fname)
  if getmetatable(self) ~= conn_handle then error(fname .. ": call it as conn:" .. fname:match("[^.:]+$") .. "(...)", 3) end
  if S[1] ~= CONNECTION or S[2] ~= rawget(self, "_serial") then
    error(fname .. ": conn handle used after its connection phase ended", 3)
  end
end

function conn_handle:get_ip() check_handle(self, "conn:get_ip"); return N.client_get_ip() end
function conn_handle:get_port() check_handle(self, "conn:get_port"); return N.client_get_port() end
function conn_handle:get_tls() check_handle(self, "conn:get_tls"); return N.client_get_tls() end
function conn_handle:get_sni() check_handle(self, "conn:get_sni"); return N.conn_get_sni() end
function conn_handle:get_alpn() check_handle(self, "conn:get_alpn"); return N.conn_get_alpn() end
function conn_handle:get_local_port() check_handle(self, "conn:get_local_port"); return N.conn_get_local_port() end
function conn_handle:get_listener() check_handle(self, "conn:get_listener"); return N.conn_get_listener() end
function conn_handle:reject(reason)
  check_handle(self, "conn:reject")
  check_optional_string("conn:reject", 1, reason)
  return N.conn_reject(reason or "rejected by plugin")
end

-- Lazy per-request and per-connection tables: created on first use.
setmetatable(weir, {
  __index = function(_, key)
    if key == "ctx" then
      if not ANY_REQUEST_PHASE[S[1]] then error("weir.ctx is not available in the " .. phase_name(S[1]) .. " phase", 2) end
      -- Published by the runtime at phase entry: no call into Swift.
      local ctx = S[3]
      if ctx ~= nil then return ctx end
      return N.ctx()
    elseif key == "conn" then
      if not ANY_PHASE[S[1]] then error("weir.conn is not available in the " .. phase_name(S[1]) .. " phase", 2) end
      return N.conn_data()
    end
    return nil
  end,
})

-- Internal helpers for the Swift runtime (not part of the SDK) -----------------

local internal = {}

-- Used when a request phase function returns (status, body, headers).
function internal.normalize_exit(status, body, headers)
  return normalize_exit("plugin return value", 0, status, body, headers)
end

-- Makes the conn handle for one connection phase call.
-- Run (as a timer) when a reload retires this state: every weir.batch queue
-- sends what it holds; a queue already flushing in another timer drains
-- itself (retiring makes its loop go on until the queue is empty), so wait
-- for it. LuaRuntime.flushBatchQueues bounds the whole by a timeout.
function internal.flush_batches()
  retiring = true
  local queues = {}
  for queue in pairs(all_queues) do queues[#queues + 1] = queue end
  for _, queue in ipairs(queues) do
    while queue.flushing do weir.sleep(0.01) end
    queue:flush(false)
  end
end

function internal.make_conn_handle(serial, data)
  return setmetatable({ _serial = serial, data = data }, conn_handle)
end

-- Checks a handler table (which may use metatables/inheritance, hence done
-- in Lua under pcall) and returns priority, version and phase functions.
function internal.inspect_handler(h, name)
  if type(h) ~= "table" then
    error("must return a table, got " .. type(h), 0)
  end
  local priority = h.PRIORITY
  if math_type(priority) ~= "integer" then
    error("PRIORITY must be an integer, got " .. type(priority), 0)
  end
  local version = h.VERSION
  if type(version) ~= "string" then
    error("VERSION must be a string, got " .. type(version), 0)
  end
  local fns = {}
  local any = false
  for _, phase in ipairs({ "connection", "request", "response", "body_filter", "log" }) do
    local f = h[phase]
    if f ~= nil then
      if type(f) ~= "function" then
        error("" .. phase .. " must be a function, got " .. type(f), 0)
      end
      fns[phase] = f
      any = true
    end
  end
  if not any then
    error("defines none of connection, request, response, body_filter, log", 0)
  end
  return priority, version, fns
end

return weir, internal
