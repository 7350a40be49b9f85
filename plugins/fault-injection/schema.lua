return {
  -- A delay needs both its share and its length; either alone is a no-op.
  required_when = { { field = "delay", when = "delay_percent" }, { field = "delay_percent", when = "delay" } },
  fields = {
  abort_percent = { type = "number", min = 0, max = 100, default = 0,
                    description = "percentage of requests answered by the gateway with abort_status instead of reaching the upstream" },
  abort_status = { type = "integer", min = 200, max = 599, default = 503,
                   description = "status of an aborted request" },
  abort_message = { type = "string", default = "fault injected",
                    description = "message of the JSON body of an aborted request" },
  delay_percent = { type = "number", min = 0, max = 100, required = false,
                    description = "percentage of requests held for delay seconds before going on (requires delay)" },
  delay = { type = "number", min = 0, max = 300, required = false,
            description = "seconds a delayed request is held (fractions allowed; requires delay_percent); the event loop keeps serving others" },
} }
