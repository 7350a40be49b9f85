local function limit(period)
  return { type = "integer", min = 1, required = false,
           description = "requests allowed per " .. period .. " (sliding window); unset = no " .. period .. " limit" }
end

return {
  -- A config without any period would count nothing: refused at load.
  at_least_one_of = { "second", "minute", "hour", "day" },
  -- limit_by header without a header name would fail every request: refused at load.
  required_when = { { field = "header_name", when = "limit_by", is = "header" } },
  fields = {
  second = limit("second"),
  minute = limit("minute"),
  hour = limit("hour"),
  day = limit("day"),
  limit_by = { type = "string", default = "consumer", one_of = { "consumer", "ip", "header", "route" },
               description = "what is counted: the authenticated consumer (the client IP when there is none), the client IP, the value of header_name (the client IP when absent), or the route (all its clients together)" },
  header_name = { type = "string", min = 1, required = false,
                  description = "request header whose value is counted when limit_by is header (required then)" },
  policy = { type = "string", default = "local", one_of = { "local", "redis" },
             description = "where counters live: local = weir.shared dictionary (exact across the event loops of this gateway); redis = a Redis server (exact across gateways sharing it)" },
  dictionary = { type = "string", min = 1, default = "rate-limiting",
                 description = "the weir.shared dictionary holding the counters (declare it under shared_dicts)" },
  fault_tolerant = { type = "boolean", default = true,
                     description = "when the counters cannot be used (dictionary missing, Redis down), let the request through (logged) instead of failing it" },
  hide_client_headers = { type = "boolean", default = false,
                          description = "do not send the RateLimit-* / X-RateLimit-* headers" },
  error_code = { type = "integer", min = 400, max = 599, default = 429, description = "status when the limit is exceeded" },
  error_message = { type = "string", default = "API rate limit exceeded", description = "message in the JSON body when the limit is exceeded" },
  redis = { type = "record", required = false, description = "the Redis server of policy redis",
            fields = {
              host = { type = "string", default = "127.0.0.1", description = "Redis host" },
              port = { type = "integer", min = 1, max = 65535, default = 6379, description = "Redis port" },
              database = { type = "integer", min = 0, default = 0, description = "Redis database number" },
              username = { type = "string", required = false, description = "ACL user name" },
              password = { type = "string", required = false, description = "password" },
              timeout = { type = "number", min = 0, default = 2, description = "seconds per Redis call" },
            } },
} }
