-- http-log: batches access records (the JSON access log's fields plus the
-- consumer) and POSTs them to a collector. The log phase only appends to a
-- bounded per-event-loop queue (weir.batch); timers send, wait and retry,
-- so a slow or dead collector never delays a request. When the queue is
-- full, records are dropped and counted (a warning line and
-- weir_plugin_events_total{plugin="http-log",event="records_dropped"}).
local weir = require "weir"

local HttpLog = { PRIORITY = 12, VERSION = "1.0.0" }

local concat = table.concat

-- One queue per config table (built once per Lua state, so per event loop).
local queues = setmetatable({}, { __mode = "k" })

-- Records are queued as JSON text (weir.log.serialize_json, encoded in
-- Swift): a batch is only joined here, never re-encoded in Lua.
local function encode(conf, records)
  if conf.format == "ndjson" then
    return concat(records, "\n") .. "\n", "application/x-ndjson"
  end
  return "[" .. concat(records, ",") .. "]", "application/json"
end

local function queue_for(conf)
  local queue = queues[conf]
  if queue then return queue end
  local headers = {}
  for name, value in pairs(conf.headers) do headers[name:lower()] = value end
  queue = weir.batch.new{
    name = "http-log " .. conf.endpoint,
    metric = "records",
    batch_size = conf.batch_size, flush_interval = conf.flush_interval, max_queued = conf.queue_size,
    retries = conf.retries, retry_delay = conf.retry_delay,
    send = function(records)
      local body, content_type = encode(conf, records)
      headers["content-type"] = content_type
      local res, err = weir.http.request(conf.endpoint, {
        method = conf.method, headers = headers, body = body, timeout = conf.timeout, max_body = 65536,
        ssl_verify = conf.ssl_verify, ca_file = conf.ca_file,
      })
      if not res then return nil, err end
      if res.status < 200 or res.status >= 300 then return nil, "collector answered " .. res.status end
      return true
    end,
  }
  queues[conf] = queue
  return queue
end

function HttpLog:log(conf, ctx)
  local record = weir.log.serialize_json()
  if record then queue_for(conf):push(record) end
end

return HttpLog
