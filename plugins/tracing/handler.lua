-- tracing: W3C Trace Context (traceparent/tracestate) at the gateway, and a
-- SERVER span per sampled request exported over OTLP/HTTP in JSON.
--
-- Request phase: continue a valid incoming traceparent (keeping its sampled
-- flag and its tracestate) or start a new trace (sampled by sample_ratio);
-- the upstream gets a traceparent whose parent is this request's span.
-- Log phase: the span (route, upstream, status, method, timings) goes into
-- a bounded per-loop queue (weir.batch); timers export batches, so nothing
-- here waits on the collector.
local weir = require "weir"

local Tracing = { PRIORITY = 100000, VERSION = "1.0.0" }

local random, floor, format, tointeger, concat = math.random, math.floor, string.format, math.tointeger, table.concat
local ZERO_TRACE, ZERO_SPAN = string.rep("0", 32), string.rep("0", 16)

-- traceparent: version "-" trace-id "-" parent-id "-" flags, lower-case hex.
-- Returns trace_id, parent_id, flags or nil when malformed. Versions other
-- than 00 (and not ff) may carry more fields after the flags.
local function parse_traceparent(value)
  if type(value) ~= "string" or #value < 55 then return nil end
  local version, trace_id, parent_id, flags, rest =
    value:match("^(%x%x)%-(%x+)%-(%x+)%-(%x%x)(.*)$")
  if not version or version == "ff" or #trace_id ~= 32 or #parent_id ~= 16 then return nil end
  if value:sub(1, 55):find("[A-F]") then return nil end
  if version == "00" and rest ~= "" then return nil end
  if rest ~= "" and rest:sub(1, 1) ~= "-" then return nil end
  if trace_id == ZERO_TRACE or parent_id == ZERO_SPAN then return nil end
  return trace_id, parent_id, tonumber(flags, 16)
end

-- 64 random bits as 16 hex digits (math.random(0): all bits random), never zero.
local function random_hex16()
  local id
  repeat id = format("%016x", random(0)) until id ~= ZERO_SPAN
  return id
end

function Tracing:request(conf, ctx)
  local trace_id, parent_id, flags = parse_traceparent(weir.request.get_header("traceparent"))
  local sampled, tracestate
  if trace_id then
    sampled = flags % 2 == 1
    tracestate = weir.request.get_header("tracestate")
  else
    -- Absent or malformed: a new trace; an orphan tracestate is dropped.
    trace_id = random_hex16() .. random_hex16()
    parent_id = nil
    sampled = conf.sample_ratio >= 1 or (conf.sample_ratio > 0 and random() < conf.sample_ratio)
  end
  local span_id = random_hex16()
  ctx.tracing = { trace_id = trace_id, span_id = span_id, parent_id = parent_id,
                  sampled = sampled, tracestate = tracestate }
  weir.upstream.request.set_header("traceparent",
    "00-" .. trace_id .. "-" .. span_id .. (sampled and "-01" or "-00"))
  if tracestate then
    weir.upstream.request.set_header("tracestate", tracestate)
  else
    weir.upstream.request.clear_header("tracestate")
  end
end

-- Spans are written as OTLP/JSON text straight away (string.format and
-- table.concat run in C), not as tables for weir.json.encode: under the
-- instruction-budget hook every Lua VM instruction is expensive, and a
-- generic encoder spends thousands per span (BENCHMARKS.md, 2026-11-29).
local escapes = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
local function escape_char(c) return escapes[c] or format("\\u%04x", c:byte()) end
local function quote(s)
  return '"' .. (s:gsub('[%c"\\]', escape_char)) .. '"'
end

-- Appends one OTLP attribute: strings, integers (int64 as a decimal
-- string) or doubles.
local function attr(list, key, value)
  if value == nil then return end
  local json
  if type(value) == "string" then
    json = '{"stringValue":' .. quote(value) .. '}'
  elseif math.type(value) == "integer" then
    json = format('{"intValue":"%d"}', value)
  else
    json = format('{"doubleValue":%.17g}', value)
  end
  list[#list + 1] = '{"key":"' .. key .. '","value":' .. json .. '}'
end

local function make_span(trace, record)
  local start_ns = tointeger(floor(record.started_at * 1e9)) or 0
  local end_ns = start_ns + (tointeger(floor(record.duration_ms * 1e6)) or 0)
  local attributes = {}
  attr(attributes, "http.request.method", record.method)
  attr(attributes, "url.path", record.path)
  attr(attributes, "url.scheme", weir.request.get_scheme())
  attr(attributes, "http.route", record.route)
  attr(attributes, "http.response.status_code", record.status)
  attr(attributes, "client.address", record.client)
  attr(attributes, "weir.request_id", record.request_id)
  attr(attributes, "weir.listener", record.listener)
  attr(attributes, "weir.upstream", record.upstream)
  attr(attributes, "weir.upstream.target", record.upstream_target)
  attr(attributes, "weir.upstream.duration_ms", record.upstream_duration_ms)
  attr(attributes, "weir.attempts", record.attempts)
  attr(attributes, "weir.consumer", record.consumer)
  local name = record.route and (record.method .. " " .. record.route) or record.method
  local parts = {
    '{"traceId":"', trace.trace_id, '","spanId":"', trace.span_id, '"',
    trace.parent_id and (',"parentSpanId":"' .. trace.parent_id .. '"') or "",
    trace.tracestate and (',"traceState":' .. quote(trace.tracestate)) or "",
    ',"name":', quote(name),
    ',"kind":2', -- SPAN_KIND_SERVER
    format(',"startTimeUnixNano":"%d","endTimeUnixNano":"%d"', start_ns, end_ns),
    ',"attributes":[', concat(attributes, ","), ']',
    record.status >= 500 and format(',"status":{"code":2,"message":"HTTP %d"}', record.status) or "", -- STATUS_CODE_ERROR
    '}',
  }
  return concat(parts)
end

local exporters = setmetatable({}, { __mode = "k" })

local function exporter_for(conf)
  local queue = exporters[conf]
  if queue then return queue end
  local resource = {}
  attr(resource, "service.name", conf.service_name)
  local names = {}
  for name in pairs(conf.resource_attributes) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do attr(resource, quote(name):sub(2, -2), conf.resource_attributes[name]) end
  -- Everything of an export request but its spans.
  local head = '{"resourceSpans":[{"resource":{"attributes":[' .. concat(resource, ",") ..
    ']},"scopeSpans":[{"scope":{"name":"weir.tracing","version":"' .. Tracing.VERSION .. '"},"spans":['
  local tail = ']}]}]}'
  local headers = { ["content-type"] = "application/json" }
  for name, value in pairs(conf.headers) do headers[name:lower()] = value end
  queue = weir.batch.new{
    name = "tracing " .. conf.endpoint, metric = "spans",
    batch_size = conf.batch_size, flush_interval = conf.flush_interval, max_queued = conf.queue_size,
    retries = conf.retries, retry_delay = conf.retry_delay,
    send = function(spans)
      local res, err = weir.http.request(conf.endpoint, {
        method = "POST", headers = headers, body = head .. concat(spans, ",") .. tail,
        timeout = conf.timeout, max_body = 65536,
        ssl_verify = conf.ssl_verify, ca_file = conf.ca_file,
      })
      if not res then return nil, err end
      if res.status < 200 or res.status >= 300 then return nil, "collector answered " .. res.status end
      return true
    end,
  }
  exporters[conf] = queue
  return queue
end

function Tracing:log(conf, ctx)
  local trace = ctx.tracing
  if not trace or not trace.sampled then return end
  local record = weir.log.serialize()
  if not record then return end
  exporter_for(conf):push(make_span(trace, record))
end

return Tracing
